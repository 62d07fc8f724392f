"""Protocol drivers: Modbus meters and OPC UA CNCs. They speak protocols and nothing else."""

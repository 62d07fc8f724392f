"""The application: configuration loading, runtime wiring, the command line.

May import every other package; nothing imports it."""

"""TwinEdge command line and the local services it starts (Mosquitto, InfluxDB)."""

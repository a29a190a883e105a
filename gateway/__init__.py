"""TwinEdge gateway: MQTT in -> decode/validate -> durable log -> InfluxDB sink (and partner mirror)."""

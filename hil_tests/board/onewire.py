# onewire shim (unix port): a bus object; the DS18B20 behaviour lives in ds18x20.py.
class OneWireError(Exception):
    pass


class OneWire:
    SEARCH_ROM = 0xF0
    MATCH_ROM = 0x55
    SKIP_ROM = 0xCC

    def __init__(self, pin):
        self.pin = pin

    def reset(self, required=False):
        return True

    def scan(self):
        import te_sim
        return [] if te_sim.missing("temp") else [bytearray(b"\x28\xff\x64\x1e\x0f\x00\x00\x5a")]

# ds18x20 shim (unix port): same API as micropython-lib's ds18x20 driver.
# "temp" in scenario `missing` -> no ROM found; in `timeout` -> CRC errors.
import te_sim


class DS18X20:
    def __init__(self, onewire):
        self.ow = onewire
        self._conv = -100000

    def scan(self):
        return [rom for rom in self.ow.scan() if rom[0] in (0x10, 0x22, 0x28)]

    def convert_temp(self):
        self._conv = te_sim.vms()

    def read_temp(self, rom):
        if te_sim.missing("temp"):
            raise Exception("CRC error")
        if te_sim.stuck("temp"):
            raise Exception("CRC error")
        if te_sim.vms() - self._conv < 750:
            return 85.0  # power-on value of the scratchpad: conversion not finished
        return round(te_sim.value("temp", 15.34) * 16) / 16

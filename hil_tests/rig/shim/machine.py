# Rig overlay of the board's `machine` shim (unix port only, never deployed).
# It runs hil_tests/board/machine.py in this module (TE_BOARD_MACHINE) and changes two
# things the rig needs and the plain shim does not offer:
#  - WDT writes its feed count to `.wdt` in the flash dir, so the rig (outside the
#    process) can see a node stop feeding and reset it, as the hardware watchdog would;
#  - the ADC read blocks while the scenario has "hang": true: a peripheral read that
#    never returns (a locked bus), which stalls the whole firmware, watchdog feeding too.
import os

exec(open(os.getenv("TE_BOARD_MACHINE")).read())

_BoardADC = ADC  # noqa: F821  (defined by the exec above)


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.fed = 0
        self._note()

    def feed(self):
        self.fed += 1
        self._note()

    def _note(self):
        te_sim.write_file(".wdt", b"%d %d" % (self.timeout, self.fed))  # noqa: F821


class ADC(_BoardADC):
    def read_uv(self):
        while te_sim.flag("hang", False):  # noqa: F821
            time.sleep_ms(20)  # noqa: F821
        return _BoardADC.read_uv(self)

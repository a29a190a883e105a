# network shim (unix port): a station interface whose access point can be switched off
# from the scenario ("wifi": false). The host's own network carries the traffic.
import te_sim

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201


class WLAN:
    def __init__(self, interface_id=0):
        self._active = False
        self._want = False

    def active(self, is_active=None):
        if is_active is None:
            return self._active
        self._active = bool(is_active)

    def connect(self, ssid=None, key=None, *a, **k):
        self._want = True

    def disconnect(self):
        self._want = False

    def isconnected(self):
        return self._active and self._want and te_sim.flag("wifi", True)

    def status(self, param=None):
        if param == "rssi":
            return te_sim.flag("rssi", -67)
        if self.isconnected():
            return STAT_GOT_IP
        return STAT_NO_AP_FOUND if self._want else STAT_IDLE

    def ifconfig(self, *a):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, *a, **k):
        if a and a[0] == "mac":
            return b"\x24\x0a\xc4\x00\x00\x01"
        return None

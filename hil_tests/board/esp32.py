# esp32 shim (unix port): the few esp32-module bits the firmware may touch.
WAKEUP_ALL_LOW = False
WAKEUP_ANY_HIGH = True


def wake_on_ext0(pin, level):
    pass


def mcu_temperature():
    return 40

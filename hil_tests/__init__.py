"""Hardware-in-the-loop rig and scenarios (see docs/hil.md)."""

"""The HIL rig: emulated/real boards, fault proxy, city stacks, accounting, scenarios."""

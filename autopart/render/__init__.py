"""Pictures and tables of plans, simulated steps and training runs, for any part to show (no torch): the
CLI draws a simulated step with them, a training rank its measured one."""

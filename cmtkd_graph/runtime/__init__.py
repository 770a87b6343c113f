"""How a process is set up to train or evaluate: the accelerator, CPU threads and logging (``process``),
and the precision it computes in, decided by measurement and recorded (``precision``). Training,
``cmtkd-graph eval`` and the study's estimates all start this way."""

"""Timestep schedules psi/xi over the process's noise level: the named kinds (``base``), their names
(``names``), and data-driven schedules (the binned loss, the fit, and a run's fitted schedule)."""

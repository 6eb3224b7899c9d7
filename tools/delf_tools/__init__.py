"""The tools around the DELF services: the `delf` command line, `delf up` (the launcher),
`delf eval` and attention training. They import the services and the shared library;
nothing in shared/ or services/ imports them."""

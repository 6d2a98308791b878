"""Every change RAPID makes to vLLM or to process-wide state, listed in ``registry.PATCHES`` with where it is
applied, why, its upstream diff and when it can go. Kept import-light: the start-up hook imports this package in
every Python process."""

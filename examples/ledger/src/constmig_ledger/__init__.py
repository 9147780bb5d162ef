"""constmig-ledger: an enclave app that lives outside constmig, installed as a package of its own."""

"""What the kernel gives us that Python does not wrap: userfaultfd (missing pages, write-protect, the
pagemap scan), through ctypes. Below both the enclave runtime and the migration code, which share it."""

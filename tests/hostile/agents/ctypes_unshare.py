# Namespaces from Python through ctypes: unshare(CLONE_NEWUSER | CLONE_NEWNS), then mount.
import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x00020000) != 0:
    print("refused unshare:", os.strerror(ctypes.get_errno()))
    raise SystemExit(75)
print("BREACH unshare succeeded")
raise SystemExit(13)

# Memory bomb in Python: grow until MemoryError, which ends the interpreter with status 1.
blocks = []
while len(blocks) < 100000:  # 100 GiB at most
    blocks.append(bytearray(1 << 20))

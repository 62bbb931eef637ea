"""qemu-img's operations, natively (convert, info formatting, map, ...)."""

"""qemu-img's operations, natively (convert, compare, check, resize, rebase, ...)."""

"""What runs inside the VM tier's guest (never on the host)."""

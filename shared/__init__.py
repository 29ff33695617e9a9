"""What every part of vmsuper shares: KVM bindings, wire framing, the schema, shared memory."""

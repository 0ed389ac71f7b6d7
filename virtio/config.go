package virtio

// ReadConfigAt copies the device config-space image cfg, from offset off,
// into p: the body of a Device's ReadConfig. The offset comes from the
// guest, so it is checked: one outside cfg leaves p untouched, and a read
// running past the end of cfg fills only the bytes cfg has.
func ReadConfigAt(cfg []byte, off int, p []byte) {
	if off >= 0 && off < len(cfg) {
		copy(p, cfg[off:])
	}
}

package virtio

// PopOrArm takes the next available chain into c, like Pop. When the
// avail ring is empty it re-arms kick notification (Arm) and then looks
// again, so a chain the driver published between the two is taken rather
// than missed; it repeats until it has a chain or the ring is empty with
// kicks armed.
//
// It reports false with a nil error only in that last case: the caller may
// then block on Kicks (and its own stop or timeout channels) without losing
// a wake-up. This is the order a device that waits for the guest's buffers
// must keep (Pop, Arm, look again, block); a device that drains the ring
// and blocks on Kicks and its stop channel alone uses Wait instead. On a
// ring violation it returns Pop's error.
func (q *Queue) PopOrArm(c *Chain) (bool, error) {
	for {
		ok, err := q.Pop(c)
		if ok || err != nil {
			return ok, err
		}
		if q.Arm() {
			return false, nil
		}
	}
}

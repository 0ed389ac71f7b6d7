package p9

// SetShutdownHook sets a function Reset calls after the session stopped
// taking answers and before it waits for in-flight requests.
func SetShutdownHook(d *Device, fn func()) { d.testHookShutdown = fn }

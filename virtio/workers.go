package virtio

import "sync"

// Workers runs a device's queue-processing goroutines and joins them. The
// zero value is ready to use; Start begins a new generation after Stop.
type Workers struct {
	mu      sync.Mutex
	stop    chan struct{}
	wg      sync.WaitGroup
	running bool
}

// Go starts fn on a new goroutine; fn must return soon after stop is
// closed. Go starts a generation if none is running.
func (w *Workers) Go(fn func(stop <-chan struct{})) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.running {
		w.stop = make(chan struct{})
		w.running = true
	}
	stop := w.stop
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		fn(stop)
	}()
}

// Stop closes the stop channel of the running generation and waits for
// all its goroutines. It is safe to call when nothing runs, and from
// several goroutines, but not from a worker.
func (w *Workers) Stop() {
	w.mu.Lock()
	if w.running {
		close(w.stop)
		w.running = false
	}
	w.mu.Unlock()
	w.wg.Wait()
}

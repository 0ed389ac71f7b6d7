package agent

import (
	"errors"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// spawner starts processes and reports their exit status.
type spawner interface {
	// start runs fork (which returns the new pid) and arranges for the
	// exit status to be delivered on the returned channel.
	start(fork func() (int, error)) (int, <-chan unix.WaitStatus, error)
}

// pidWaiter waits for each child with wait4(pid): the right choice when the
// agent is not PID 1 and shares its process with other code.
type pidWaiter struct{}

func (pidWaiter) start(fork func() (int, error)) (int, <-chan unix.WaitStatus, error) {
	pid, err := fork()
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	go func() {
		var ws unix.WaitStatus
		for {
			_, err := unix.Wait4(pid, &ws, 0, nil)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				ws = unix.WaitStatus(0xff00) // exit code 255: status lost
			}
			break
		}
		ch <- ws
	}()
	return pid, ch, nil
}

// Reaper reaps every child of the process with wait4(-1), as PID 1 must, and
// hands the exit status of the agent's own processes to the agent. Orphans
// re-parented to PID 1 are reaped and forgotten.
type Reaper struct {
	mu      sync.Mutex
	waiting map[int]chan unix.WaitStatus
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// NewReaper starts a reaper goroutine. Stop it with Close.
func NewReaper() *Reaper {
	r := &Reaper{
		waiting: make(map[int]chan unix.WaitStatus),
		kick:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	go r.loop()
	return r
}

// Close stops the reaper goroutine once it has no children left to wait
// for; safe to call twice.
func (r *Reaper) Close() error {
	r.once.Do(func() { close(r.stop) })
	return nil
}

func (r *Reaper) start(fork func() (int, error)) (int, <-chan unix.WaitStatus, error) {
	// Holding mu across fork means the loop cannot deliver this child's
	// status before it is registered.
	r.mu.Lock()
	pid, err := fork()
	if err != nil {
		r.mu.Unlock()
		return 0, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiting[pid] = ch
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
	return pid, ch, nil
}

func (r *Reaper) loop() {
	defer close(r.done)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		switch {
		case err == nil:
			r.mu.Lock()
			ch, ok := r.waiting[pid]
			delete(r.waiting, pid)
			r.mu.Unlock()
			if ok {
				ch <- ws
			}
		case errors.Is(err, syscall.EINTR):
		default: // ECHILD: nothing to wait for until a child is started or re-parented
			select {
			case <-r.stop:
				return
			case <-r.kick:
			case <-tick.C:
			}
		}
	}
}

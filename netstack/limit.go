package netstack

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Clock is the time source of the rate limiters. Tests inject a fake one;
// the zero Config uses the system clock.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// Sleep waits for d or until ctx is done, and returns ctx.Err() then.
	Sleep(ctx context.Context, d time.Duration) error
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

func (systemClock) Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// RateLimit is a token bucket: Rate units per second, up to Burst at once.
// A zero Rate means unlimited. A zero Burst means one second's worth of Rate.
type RateLimit struct {
	Rate  float64
	Burst float64
}

// Limits bounds what one sandbox may use.
type Limits struct {
	// MaxConnections caps concurrent proxied flows (TCP connections, UDP
	// flows, published-port connections). 0 means DefaultMaxConnections;
	// values above MaxConnectionsLimit are rejected.
	MaxConnections int
	// EgressBytes and IngressBytes limit payload bandwidth in bytes per
	// second, guest→world and world→guest. The limit shapes (waits), it does
	// not drop.
	EgressBytes, IngressBytes RateLimit
	// EgressPackets and IngressPackets limit Ethernet frames per second.
	// Egress frames wait in DeliverFrame (backpressure to the device);
	// ingress frames over the limit are dropped.
	EgressPackets, IngressPackets RateLimit
}

// Connection limits.
const (
	DefaultMaxConnections = 256
	MaxConnectionsLimit   = 4096
)

// tokenBucket is a shaping token bucket. Tokens may go negative: a caller
// takes what it needs and sleeps off the debt, so one big request is not
// starved by small ones.
type tokenBucket struct {
	rate, burst float64
	clock       Clock

	mu     sync.Mutex
	tokens float64
	last   time.Time

	// Counters for tests and metrics.
	taken  atomic.Uint64 // units taken
	waits  atomic.Uint64 // number of waits (refills needed)
	waited atomic.Int64  // total nanoseconds waited
	drops  atomic.Uint64 // tryTake failures
}

func newBucket(l RateLimit, c Clock) *tokenBucket {
	if l.Rate <= 0 {
		return nil
	}
	burst := l.Burst
	if burst <= 0 {
		burst = l.Rate
	}
	return &tokenBucket{rate: l.Rate, burst: burst, clock: c, tokens: burst, last: c.Now()}
}

func (b *tokenBucket) refillLocked() {
	now := b.clock.Now()
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = min(b.burst, b.tokens+dt.Seconds()*b.rate)
		b.last = now
	}
}

// wait takes n tokens, sleeping while the bucket is in debt. A nil bucket
// never waits.
func (b *tokenBucket) wait(ctx context.Context, n int) error {
	if b == nil || n <= 0 {
		return nil
	}
	b.mu.Lock()
	b.refillLocked()
	b.tokens -= float64(n)
	var d time.Duration
	if b.tokens < 0 {
		d = time.Duration(-b.tokens / b.rate * float64(time.Second))
	}
	b.mu.Unlock()
	b.taken.Add(uint64(n))
	if d <= 0 {
		return nil
	}
	b.waits.Add(1)
	b.waited.Add(int64(d))
	return b.clock.Sleep(ctx, d)
}

// tryTake takes n tokens if the bucket has them and reports whether it did.
func (b *tokenBucket) tryTake(n int) bool {
	if b == nil {
		return true
	}
	b.mu.Lock()
	b.refillLocked()
	ok := b.tokens >= float64(n)
	if ok {
		b.tokens -= float64(n)
	}
	b.mu.Unlock()
	if ok {
		b.taken.Add(uint64(n))
	} else {
		b.drops.Add(1)
	}
	return ok
}

// connLimiter counts concurrent flows.
type connLimiter struct {
	max    int64
	active atomic.Int64
	denied atomic.Uint64
}

func (c *connLimiter) acquire() bool {
	if c.active.Add(1) > c.max {
		c.active.Add(-1)
		c.denied.Add(1)
		return false
	}
	return true
}

func (c *connLimiter) release() { c.active.Add(-1) }

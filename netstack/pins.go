package netstack

import (
	"net/netip"
	"sync"
	"time"
)

// Pin table limits: a hostile guest can resolve many names, so the table is
// bounded; expired pins are evicted first, then the oldest.
const (
	maxPinnedAddrs = 8192
	minPinTTL      = 60 * time.Second
	maxPinTTL      = 24 * time.Hour
)

// pinTable records which names this sandbox resolved to which addresses, so a
// domain rule matches a connection only to an address resolved for that name.
type pinTable struct {
	now func() time.Time

	mu sync.Mutex
	// byAddr maps an address to the names it was resolved for, each with its
	// expiry.
	byAddr map[netip.Addr]map[string]time.Time
	n      int
}

func newPinTable(now func() time.Time) *pinTable {
	return &pinTable{now: now, byAddr: make(map[netip.Addr]map[string]time.Time)}
}

// record pins addr to name for ttl (clamped to [minPinTTL, maxPinTTL]: guests
// often cache answers for longer than their TTL).
func (t *pinTable) record(name string, addr netip.Addr, ttl time.Duration) {
	ttl = min(max(ttl, minPinTTL), maxPinTTL)
	addr = addr.Unmap()
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	names := t.byAddr[addr]
	if names == nil {
		names = make(map[string]time.Time)
		t.byAddr[addr] = names
	}
	if _, ok := names[name]; !ok {
		if t.n >= maxPinnedAddrs {
			t.evictLocked(now)
		}
		t.n++
	}
	names[name] = now.Add(ttl)
}

func (t *pinTable) evictLocked(now time.Time) {
	var oldA netip.Addr
	var oldN string
	var oldT time.Time
	for a, names := range t.byAddr {
		for n, exp := range names {
			if !exp.After(now) {
				t.removeLocked(a, n)
				continue
			}
			if oldT.IsZero() || exp.Before(oldT) {
				oldA, oldN, oldT = a, n, exp
			}
		}
	}
	if t.n >= maxPinnedAddrs && !oldT.IsZero() {
		t.removeLocked(oldA, oldN)
	}
}

func (t *pinTable) removeLocked(a netip.Addr, name string) {
	names := t.byAddr[a]
	if _, ok := names[name]; !ok {
		return
	}
	delete(names, name)
	t.n--
	if len(names) == 0 {
		delete(t.byAddr, a)
	}
}

// matches reports whether addr has an unexpired pin for a name the domain
// target covers.
func (t *pinTable) matches(target Target, addr netip.Addr) bool {
	addr = addr.Unmap()
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	for name, exp := range t.byAddr[addr] {
		if exp.After(now) && target.matchName(name) {
			return true
		}
	}
	return false
}

// len returns the number of (address, name) pins.
func (t *pinTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n
}

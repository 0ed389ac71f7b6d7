// Package guestmem holds a guest's physical memory: anonymous host mappings
// laid out at guest-physical addresses, and bounds-checked accessors that
// every reader of guest memory (boot loader, virtqueues, devices) must use.
//
// The guest is hostile: every address and length it hands to the host is
// untrusted. Every accessor here checks that [gpa, gpa+n) lies inside one RAM
// region and returns a *RangeError (matching ErrOutOfRange) otherwise; none of
// them panics on guest-supplied values.
//
// Layout on x86-64: RAM starts at guest-physical 0. RAM beyond 3 GiB is
// placed above 4 GiB so that [3 GiB, 4 GiB) stays free for MMIO (PCI
// MMCONFIG, BARs, IOAPIC, LAPIC).
package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
)

const (
	// MMIOHoleStart is the first guest-physical address of the MMIO hole.
	MMIOHoleStart = 3 << 30
	// MMIOHoleEnd is the first guest-physical address after the MMIO hole.
	MMIOHoleEnd = 4 << 30
	// PageSize is the granularity of guest memory sizes.
	PageSize = 4096
	// MaxSize is the largest guest memory New accepts (1 TiB).
	MaxSize = 1 << 40
)

// ErrOutOfRange is matched (errors.Is) by every *RangeError.
var ErrOutOfRange = errors.New("guest memory access out of range")

// ErrClosed is returned by accessors after Close.
var ErrClosed = errors.New("guest memory is closed")

// ErrPopulateUnsupported means the host kernel cannot populate memory ahead
// of use (MADV_POPULATE_WRITE needs Linux 5.14); nothing is wrong, the
// guest's own accesses fault the pages in instead.
var ErrPopulateUnsupported = errors.New("guestmem: the host kernel cannot populate memory ahead of use (Linux 5.14 or later can)")

// RangeError reports an access to guest-physical memory that is not backed
// by a single RAM region.
type RangeError struct {
	GPA uint64 // first guest-physical address of the access
	Len uint64 // length of the access in bytes
}

func (e *RangeError) Error() string {
	return fmt.Sprintf("guest memory access [%#x, +%#x) is outside guest RAM", e.GPA, e.Len)
}

// Is makes errors.Is(err, ErrOutOfRange) true.
func (e *RangeError) Is(target error) bool { return target == ErrOutOfRange }

// SizeError reports a memory size New cannot use.
type SizeError struct {
	Size uint64
	Why  string
}

func (e *SizeError) Error() string {
	return fmt.Sprintf("guest memory size %d bytes: %s", e.Size, e.Why)
}

// Region is one contiguous block of guest RAM.
type Region struct {
	GPA  uint64 // first guest-physical address
	Size uint64 // bytes
	host []byte // host mapping, len(host) == Size
}

// Host returns the host mapping that backs the region. Callers outside the
// VMM should prefer Memory's checked accessors.
func (r Region) Host() []byte { return r.host }

// Memory is a guest's physical RAM. Its accessors are safe for concurrent
// use; Close must not race with them.
type Memory struct {
	size    uint64
	regions []Region

	mu     sync.Mutex
	closed bool
}

// Layout returns the guest-physical regions New would create for size bytes.
func Layout(size uint64) []Region {
	if size <= MMIOHoleStart {
		return []Region{{GPA: 0, Size: size}}
	}
	return []Region{
		{GPA: 0, Size: MMIOHoleStart},
		{GPA: MMIOHoleEnd, Size: size - MMIOHoleStart},
	}
}

// New maps size bytes of anonymous memory (MAP_NORESERVE: pages cost host
// memory only once the guest touches them) laid out as Layout describes.
// size must be a positive multiple of PageSize and at most MaxSize.
func New(size uint64) (*Memory, error) {
	switch {
	case size == 0:
		return nil, &SizeError{size, "must be positive"}
	case size%PageSize != 0:
		return nil, &SizeError{size, "must be a multiple of 4096"}
	case size > MaxSize:
		return nil, &SizeError{size, "larger than the 1 TiB limit"}
	}
	m := &Memory{size: size}
	for _, r := range Layout(size) {
		b, err := mapAnon(r.Size)
		if err != nil {
			m.unmapAll()
			return nil, fmt.Errorf("guestmem: map %d bytes: %w", r.Size, err)
		}
		r.host = b
		m.regions = append(m.regions, r)
	}
	return m, nil
}

// Size returns the total RAM in bytes.
func (m *Memory) Size() uint64 { return m.size }

// Regions returns the RAM regions in ascending guest-physical order.
func (m *Memory) Regions() []Region { return append([]Region(nil), m.regions...) }

// End returns the first guest-physical address above all RAM.
func (m *Memory) End() uint64 {
	last := m.regions[len(m.regions)-1]
	return last.GPA + last.Size
}

// Close unmaps the memory. It is safe to call more than once.
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	return m.unmapAll()
}

func (m *Memory) unmapAll() error {
	var first error
	for i := range m.regions {
		if m.regions[i].host == nil {
			continue
		}
		if err := unmap(m.regions[i].host); err != nil && first == nil {
			first = err
		}
		m.regions[i].host = nil
	}
	return first
}

// Slice returns the host bytes backing [gpa, gpa+n). The range must lie in
// one region. The slice aliases guest memory: the guest may change it at any
// time, so copy values out before validating them.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	for i := range m.regions {
		r := &m.regions[i]
		if gpa < r.GPA || gpa-r.GPA >= r.Size {
			continue
		}
		off := gpa - r.GPA
		if n > r.Size-off {
			break
		}
		if r.host == nil {
			return nil, ErrClosed
		}
		return r.host[off : off+n : off+n], nil
	}
	if n == 0 && gpa == m.End() {
		return []byte{}, nil
	}
	return nil, &RangeError{GPA: gpa, Len: n}
}

// Contains reports whether [gpa, gpa+n) lies in one RAM region.
func (m *Memory) Contains(gpa, n uint64) bool {
	_, err := m.Slice(gpa, n)
	return err == nil
}

// ReadAt copies len(p) bytes from guest-physical address gpa into p.
func (m *Memory) ReadAt(p []byte, gpa uint64) error {
	b, err := m.Slice(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(p, b)
	return nil
}

// WriteAt copies p to guest-physical address gpa.
func (m *Memory) WriteAt(p []byte, gpa uint64) error {
	b, err := m.Slice(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(b, p)
	return nil
}

// Uint16 reads a little-endian uint16 at gpa.
func (m *Memory) Uint16(gpa uint64) (uint16, error) {
	b, err := m.Slice(gpa, 2)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(b), nil
}

// Uint32 reads a little-endian uint32 at gpa.
func (m *Memory) Uint32(gpa uint64) (uint32, error) {
	b, err := m.Slice(gpa, 4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}

// Uint64 reads a little-endian uint64 at gpa.
func (m *Memory) Uint64(gpa uint64) (uint64, error) {
	b, err := m.Slice(gpa, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// PutUint16 writes a little-endian uint16 at gpa.
func (m *Memory) PutUint16(gpa uint64, v uint16) error {
	b, err := m.Slice(gpa, 2)
	if err != nil {
		return err
	}
	binary.LittleEndian.PutUint16(b, v)
	return nil
}

// PutUint32 writes a little-endian uint32 at gpa.
func (m *Memory) PutUint32(gpa uint64, v uint32) error {
	b, err := m.Slice(gpa, 4)
	if err != nil {
		return err
	}
	binary.LittleEndian.PutUint32(b, v)
	return nil
}

// PutUint64 writes a little-endian uint64 at gpa.
func (m *Memory) PutUint64(gpa uint64, v uint64) error {
	b, err := m.Slice(gpa, 8)
	if err != nil {
		return err
	}
	binary.LittleEndian.PutUint64(b, v)
	return nil
}

// MapFile makes [gpa, gpa+n) a private, copy-on-write mapping of n bytes of
// f from offset off: the guest reads the file's pages from the host page
// cache (shared by every VM that maps the same file) and its writes stay its
// own. gpa, off and n must be multiples of PageSize and the range must lie
// in one region. Where the file system cannot map the file, or is a network
// or FUSE file system (whose pages may be re-read from a server, so a file
// changed there would change the guest's kernel under it), MapFile copies the
// bytes instead. Call it before the guest runs.
func (m *Memory) MapFile(gpa uint64, f *os.File, off int64, n uint64) error {
	if gpa%PageSize != 0 || uint64(off)%PageSize != 0 || n%PageSize != 0 || n == 0 || off < 0 {
		return fmt.Errorf("guestmem: MapFile(%#x, off %#x, %#x): not page-aligned", gpa, off, n)
	}
	b, err := m.Slice(gpa, n)
	if err != nil {
		return err
	}
	if localFile(f) && mapFileFixed(b, f.Fd(), off) == nil {
		return nil
	}
	if k, err := f.ReadAt(b, off); uint64(k) != n {
		return fmt.Errorf("guestmem: copy %d bytes of %s at %#x: %w", n, f.Name(), off, err)
	}
	return nil
}

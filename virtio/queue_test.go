package virtio_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

const (
	memSize  = 1 << 20
	ringBase = 0x1000
	dataBase = 0x10000
	dataSize = 0x40000
)

func newMem(t testing.TB) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(memSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// pair returns a driver queue and the device queue over it.
func pair(t testing.TB, mem *guestmem.Memory, size uint16, eventIdx bool) (*virtiotest.DriverQueue, *virtio.Queue, *[]error, *int) {
	t.Helper()
	dq := virtiotest.NewDriverQueue(mem, size, ringBase, dataBase, dataSize)
	dq.EventIdx = eventIdx
	var fails []error
	irqs := 0
	cfg := dq.Config(3)
	cfg.Fail = func(err error) { fails = append(fails, err) }
	cfg.Interrupt = func() error { irqs++; return nil }
	q, err := virtio.NewQueue(mem, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return dq, q, &fails, &irqs
}

func TestNewQueueRejects(t *testing.T) {
	mem := newMem(t)
	ok := virtio.QueueConfig{Size: 16, MaxSize: 256, DescAddr: 0x1000, AvailAddr: 0x2000, UsedAddr: 0x3000}
	tests := []struct {
		name string
		mod  func(c *virtio.QueueConfig)
		want error
	}{
		{"size 0", func(c *virtio.QueueConfig) { c.Size = 0 }, virtio.ErrQueueSize},
		{"size above max", func(c *virtio.QueueConfig) { c.Size = 512 }, virtio.ErrQueueSize},
		{"size not a power of two", func(c *virtio.QueueConfig) { c.Size = 24 }, virtio.ErrQueueSize},
		{"size above 32768", func(c *virtio.QueueConfig) { c.Size = 65535; c.MaxSize = 0 }, virtio.ErrQueueSize},
		{"desc misaligned", func(c *virtio.QueueConfig) { c.DescAddr = 0x1008 }, virtio.ErrRingAddress},
		{"avail odd", func(c *virtio.QueueConfig) { c.AvailAddr = 0x2001 }, virtio.ErrRingAddress},
		{"used misaligned", func(c *virtio.QueueConfig) { c.UsedAddr = 0x3002 }, virtio.ErrRingAddress},
		{"desc outside RAM", func(c *virtio.QueueConfig) { c.DescAddr = memSize }, virtio.ErrRingAddress},
		{"desc straddles end", func(c *virtio.QueueConfig) { c.DescAddr = memSize - 16*8 }, virtio.ErrRingAddress},
		{"avail straddles end", func(c *virtio.QueueConfig) { c.AvailAddr = memSize - 8 }, virtio.ErrRingAddress},
		{"used straddles end", func(c *virtio.QueueConfig) { c.UsedAddr = memSize - 64 }, virtio.ErrRingAddress},
		{"used address wraps", func(c *virtio.QueueConfig) { c.UsedAddr = ^uint64(0) &^ 3 }, virtio.ErrRingAddress},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.mod(&c)
			_, err := virtio.NewQueue(mem, c)
			var qe *virtio.QueueError
			if !errors.As(err, &qe) || !errors.Is(err, tc.want) {
				t.Fatalf("NewQueue = %v, want *QueueError matching %v", err, tc.want)
			}
		})
	}
	if _, err := virtio.NewQueue(mem, ok); err != nil {
		t.Fatalf("valid config: %v", err)
	}
}

func TestHostileRings(t *testing.T) {
	for _, size := range []uint16{1, 2, 256} {
		for _, c := range virtiotest.HostileRings() {
			t.Run(c.Name, func(t *testing.T) {
				if size < c.MinSize {
					t.Skip("queue too small for this case")
				}
				mem := newMem(t)
				dq, q, fails, _ := pair(t, mem, size, true)
				c.Setup(dq)
				var ch virtio.Chain
				_, err := q.Pop(&ch)
				if !errors.Is(err, c.Want) {
					t.Fatalf("size %d: Pop = %v, want %v", size, err, c.Want)
				}
				if len(*fails) != 1 || (*fails)[0] != err {
					t.Fatalf("Fail called %d times (%v), want once with the Pop error", len(*fails), *fails)
				}
				// The queue stays broken and Fail is not repeated.
				if _, err2 := q.Pop(&ch); err2 != err {
					t.Fatalf("second Pop = %v, want the same error", err2)
				}
				if q.Wait(nil) {
					t.Fatal("Wait on a broken queue reported work")
				}
				if len(*fails) != 1 {
					t.Fatalf("Fail called %d times", len(*fails))
				}
			})
		}
	}
}

func TestChainWalk(t *testing.T) {
	mem := newMem(t)
	dq, q, fails, _ := pair(t, mem, 8, false)
	head, err := dq.Add([][]byte{[]byte("hello, "), []byte("world")}, 4, 8)
	if err != nil {
		t.Fatal(err)
	}
	var ch virtio.Chain
	ok, err := q.Pop(&ch)
	if err != nil || !ok {
		t.Fatalf("Pop = %v, %v", ok, err)
	}
	if ch.Head != head || len(ch.Readable) != 2 || len(ch.Writable) != 2 {
		t.Fatalf("chain head %d (want %d), %d readable, %d writable", ch.Head, head, len(ch.Readable), len(ch.Writable))
	}
	got := make([]byte, ch.ReadableLen())
	ch.CopyFromGuest(got, 0)
	if string(got) != "hello, world" {
		t.Fatalf("readable = %q", got)
	}
	part := make([]byte, 4)
	if n := ch.CopyFromGuest(part, 5); n != 4 || string(part) != ", wo" {
		t.Fatalf("CopyFromGuest at 5 = %d %q", n, part)
	}
	if ch.WritableLen() != 12 {
		t.Fatalf("WritableLen = %d", ch.WritableLen())
	}
	if n := ch.CopyToGuest(2, []byte("0123456789abcdef")); n != 10 {
		t.Fatalf("CopyToGuest = %d, want 10", n)
	}
	q.Push(ch.Head, 12)
	u, ok, err := dq.PopUsed()
	if err != nil || !ok {
		t.Fatalf("PopUsed = %v %v", ok, err)
	}
	if u.Head != head || u.Len != 12 || !bytes.Equal(u.Written, []byte("\x00\x000123456789")) {
		t.Fatalf("used = %+v", u)
	}
	if ok, err := q.Pop(&ch); ok || err != nil {
		t.Fatalf("Pop on empty ring = %v %v", ok, err)
	}
	if len(*fails) != 0 {
		t.Fatal(*fails)
	}
}

func TestIndirectChain(t *testing.T) {
	mem := newMem(t)
	dq, q, _, _ := pair(t, mem, 4, false)
	tbl := uint64(dataBase)
	buf := uint64(dataBase + 0x1000)
	mem.WriteAt([]byte("abcd"), buf)
	virtiotest.WriteDescAt(mem, tbl, buf+1, 2, virtio.DescFNext, 1)
	virtiotest.WriteDescAt(mem, tbl+16, buf+0x100, 8, virtio.DescFWrite|virtio.DescFNext, 2)
	virtiotest.WriteDescAt(mem, tbl+32, buf+0x200, 8, virtio.DescFWrite, 0)
	// A direct descriptor before the indirect one is allowed.
	dq.WriteDesc(2, buf, 1, virtio.DescFNext, 3)
	dq.WriteDesc(3, tbl, 48, virtio.DescFIndirect, 0)
	dq.PublishRaw(2, 1)
	var ch virtio.Chain
	ok, err := q.Pop(&ch)
	if !ok || err != nil {
		t.Fatalf("Pop = %v %v", ok, err)
	}
	got := make([]byte, 8)
	if n := ch.CopyFromGuest(got, 0); len(ch.Readable) != 2 || len(ch.Writable) != 2 || n != 3 || string(got[:3]) != "abc" {
		t.Fatalf("readable %d (%q), writable %d", len(ch.Readable), got[:n], len(ch.Writable))
	}
	// Five descriptors in a queue of four: too long.
	for i := range 5 {
		flags := uint16(virtio.DescFWrite | virtio.DescFNext)
		if i == 4 {
			flags = virtio.DescFWrite
		}
		virtiotest.WriteDescAt(mem, tbl+16*uint64(i), buf+0x100, 8, flags, uint16(i+1))
	}
	dq.WriteDesc(0, tbl, 80, virtio.DescFIndirect, 0)
	dq.PublishRaw(0, 1)
	if _, err := q.Pop(&ch); !errors.Is(err, virtio.ErrChainTooLong) {
		t.Fatalf("Pop of a 5-descriptor chain in a 4-entry queue = %v", err)
	}
}

func TestIndirectNotNegotiated(t *testing.T) {
	mem := newMem(t)
	dq := virtiotest.NewDriverQueue(mem, 4, ringBase, dataBase, dataSize)
	cfg := dq.Config(0)
	cfg.Indirect = false
	q, err := virtio.NewQueue(mem, cfg)
	if err != nil {
		t.Fatal(err)
	}
	virtiotest.WriteDescAt(mem, dataBase, dataBase+0x100, 8, virtio.DescFWrite, 0)
	dq.WriteDesc(0, dataBase, 16, virtio.DescFIndirect, 0)
	dq.PublishRaw(0, 1)
	var ch virtio.Chain
	if _, err := q.Pop(&ch); !errors.Is(err, virtio.ErrIndirect) {
		t.Fatalf("Pop = %v, want ErrIndirect", err)
	}
}

func TestEventIdxSuppression(t *testing.T) {
	mem := newMem(t)
	dq, q, _, irqs := pair(t, mem, 8, true)
	var ch virtio.Chain
	for i := range 3 {
		dq.Add(nil, 8)
		q.Pop(&ch)
		q.Push(ch.Head, 0)
		_ = i
	}
	// used_event is still 0 (the driver consumed nothing): the first push
	// crossed it, so exactly one interrupt is due for the batch.
	if err := q.Notify(); err != nil {
		t.Fatal(err)
	}
	if *irqs != 1 {
		t.Fatalf("interrupts = %d, want 1", *irqs)
	}
	// Nothing new: no interrupt.
	q.Notify()
	if *irqs != 1 {
		t.Fatalf("interrupts = %d after an empty Notify", *irqs)
	}
	// The driver consumes all three (used_event = 3) and asks for the next.
	for range 3 {
		dq.PopUsed()
	}
	dq.Add(nil, 8)
	q.Pop(&ch)
	q.Push(ch.Head, 0)
	q.Notify()
	if *irqs != 2 {
		t.Fatalf("interrupts = %d, want 2", *irqs)
	}
	// The driver sets used_event far ahead: suppressed.
	dq.PopUsed()
	mem.PutUint16(dq.Avail+4+2*8, 100)
	dq.Add(nil, 8)
	q.Pop(&ch)
	q.Push(ch.Head, 0)
	q.Notify()
	if *irqs != 2 {
		t.Fatalf("interrupts = %d, want still 2 (used_event ahead)", *irqs)
	}
}

func TestNoInterruptFlag(t *testing.T) {
	mem := newMem(t)
	dq, q, _, irqs := pair(t, mem, 8, false)
	mem.PutUint16(dq.Avail, 1) // VIRTQ_AVAIL_F_NO_INTERRUPT
	var ch virtio.Chain
	dq.Add(nil, 8)
	q.Pop(&ch)
	q.Push(ch.Head, 0)
	q.Notify()
	if *irqs != 0 {
		t.Fatalf("interrupts = %d with NO_INTERRUPT", *irqs)
	}
	mem.PutUint16(dq.Avail, 0)
	dq.Add(nil, 8)
	q.Pop(&ch)
	q.Push(ch.Head, 0)
	q.Notify()
	if *irqs != 1 {
		t.Fatalf("interrupts = %d, want 1", *irqs)
	}
}

func TestWaitArmsAvailEvent(t *testing.T) {
	mem := newMem(t)
	dq, q, _, _ := pair(t, mem, 8, true)
	stop := make(chan struct{})
	// Work already published: Wait returns at once, without a kick.
	dq.Add(nil, 8)
	if !q.Wait(stop) {
		t.Fatal("Wait = false with a chain pending")
	}
	var ch virtio.Chain
	q.Pop(&ch)
	done := make(chan bool)
	go func() { done <- q.Wait(stop) }()
	// The device wants a kick at avail index 1 once it is waiting; the
	// driver publishes, sees avail_event, and kicks.
	dq.Add(nil, 8)
	q.Kick()
	if !<-done {
		t.Fatal("Wait = false after a kick")
	}
	if ev, _ := mem.Uint16(dq.Used + 4 + 8*8); ev != 1 {
		t.Fatalf("avail_event = %d, want 1", ev)
	}
	close(stop)
	q.Pop(&ch)
	if q.Wait(stop) {
		t.Fatal("Wait = true after stop")
	}
}

func TestUsedIndexWraps(t *testing.T) {
	mem := newMem(t)
	dq, q, fails, _ := pair(t, mem, 2, false)
	var ch virtio.Chain
	for i := range 70000 {
		if _, err := dq.Add(nil, 1); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		ok, err := q.Pop(&ch)
		if !ok || err != nil {
			t.Fatalf("round %d: Pop = %v %v", i, ok, err)
		}
		q.Push(ch.Head, 1)
		if _, ok, err := dq.PopUsed(); !ok || err != nil {
			t.Fatalf("round %d: PopUsed = %v %v", i, ok, err)
		}
	}
	if len(*fails) != 0 {
		t.Fatal(*fails)
	}
}

// BenchmarkPopPush measures the device side of the ring: one 3-descriptor
// chain (a block request's shape) walked, validated and returned per op.
func BenchmarkPopPush(b *testing.B) {
	mem := newMem(b)
	dq, q, _, _ := pair(b, mem, 256, true)
	dq.WriteDesc(0, dataBase, 16, virtio.DescFNext, 1)
	dq.WriteDesc(1, dataBase+0x1000, 4096, virtio.DescFWrite|virtio.DescFNext, 2)
	dq.WriteDesc(2, dataBase+0x2000, 1, virtio.DescFWrite, 0)
	var ch virtio.Chain
	b.ReportAllocs()
	for b.Loop() {
		dq.PublishRaw(0, 1)
		if ok, err := q.Pop(&ch); !ok || err != nil {
			b.Fatal(ok, err)
		}
		q.Push(ch.Head, 4097)
		q.Notify()
	}
}

func TestQueueString(t *testing.T) {
	mem := newMem(t)
	dq, q, _, _ := pair(t, mem, 8, true)
	if _, err := dq.Add([][]byte{[]byte("a")}); err != nil {
		t.Fatal(err)
	}
	if _, err := dq.Add([][]byte{[]byte("b")}); err != nil {
		t.Fatal(err)
	}
	q.Kick()
	var c virtio.Chain
	if ok, err := q.Pop(&c); !ok || err != nil {
		t.Fatalf("Pop = %v, %v", ok, err)
	}
	q.Push(c.Head, 0)
	q.Notify()
	q.Arm()
	got := q.String()
	want := "queue 3 (size 8): avail idx 2, used idx 1, used_event 0, avail_event 1, 1 kicks, 1 interrupts"
	if got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

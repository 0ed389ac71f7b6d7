package vmm

import (
	"context"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/internal/leakcheck"
)

// kickGuest writes 1 to MMIO 0x30000000 (an ioevent) and then to port
// 0x500, then halts.
var kickGuest = []byte{
	0xbb, 0x00, 0x00, 0x00, 0x30, // mov ebx,0x30000000
	0xc7, 0x03, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx],1
	0xb8, 0x2a, 0x00, 0x00, 0x00, // mov eax,42
	0x66, 0xba, 0x00, 0x05, // mov dx,0x500
	0xef,       // out dx,eax
	0xf4,       // hlt
	0xeb, 0xfd, // jmp hlt
}

func TestIoeventBypassesTheVMM(t *testing.T) {
	requireKVM(t)
	vm, d := newTestVM(t, 1, nil)
	defer vm.Close()
	ev, err := vm.Ioevent(0x30000000, 4)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Memory().WriteAt(kickGuest, codeAddr); err != nil {
		t.Fatal(err)
	}
	if err := vm.SetupLongMode(codeAddr, 0); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	woke := make(chan error, 1)
	go func() { woke <- ev.Wait() }()
	select {
	case err := <-woke:
		if err != nil {
			t.Fatalf("Wait: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the guest's write never signalled the ioevent")
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		d.mu.Lock()
		n := len(d.ports)
		d.mu.Unlock()
		if n > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	d.mu.Lock()
	if _, ok := d.mmio[0x30000000]; ok {
		t.Error("the write reached the MMIO handler despite the ioevent")
	}
	if len(d.ports) != 1 || d.ports[0] != 42 {
		t.Errorf("port writes %v, want [42]", d.ports)
	}
	d.mu.Unlock()
	// Close unblocks a pending Wait.
	go func() { woke <- ev.Wait() }()
	time.Sleep(10 * time.Millisecond)
	if err := ev.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-woke:
		if err == nil {
			t.Error("Wait after Close returned nil")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not unblock Wait")
	}
	if err := ev.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	vm.Stop(ctx)
}

func TestMSIRoutesAreReleased(t *testing.T) {
	requireKVM(t)
	vm, _ := newTestVM(t, 1, nil)
	defer vm.Close()
	before0, _ := leakcheck.Take()
	before := before0.FDs
	for i := 0; i < 50; i++ {
		irq, err := vm.MSI(0xfee00000, uint32(0x30+i%16))
		if err != nil {
			t.Fatal(err)
		}
		if err := irq.Trigger(); err != nil {
			t.Fatal(err)
		}
		if err := irq.Close(); err != nil {
			t.Fatal(err)
		}
		if err := irq.Trigger(); err == nil {
			t.Fatal("Trigger after Close succeeded")
		}
	}
	if after0, _ := leakcheck.Take(); after0.FDs != before {
		after := after0.FDs
		t.Errorf("fds %d before, %d after 50 MSIs", before, after)
	}
	vm.mu.Lock()
	n := len(vm.routes)
	vm.mu.Unlock()
	if n != 0 {
		t.Errorf("%d MSI routes left", n)
	}
	line, err := vm.IRQLine(5)
	if err != nil {
		t.Fatal(err)
	}
	if err := line.SetLevel(true); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.IRQLine(24); err == nil {
		t.Error("IRQ line 24 accepted")
	}
}

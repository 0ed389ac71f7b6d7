package kernel_test

import (
	"context"
	"log/slog"

	"github.com/gosandbox/sandbox/kernel"
	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot"
)

// Find the default kernel (module cache, or download and verify it), then
// load it into guest memory, mapping its segments instead of copying them.
func ExampleDefault() {
	ctx := context.Background()
	k, err := kernel.Default(ctx, kernel.WithLogger(slog.Default()))
	if err != nil {
		panic(err) // e.g. errors.Is(err, kernel.ErrKernelNotFound)
	}
	mem, err := guestmem.New(256 << 20)
	if err != nil {
		panic(err)
	}
	defer mem.Close()
	loaded, err := k.Load(mem, linuxboot.Config{
		Cmdline: "console=ttyS0",
		Mapper:  mem, // map vmlinux segments copy-on-write
	})
	if err != nil {
		panic(err)
	}
	_ = loaded // RIP = loaded.Entry, RSI = loaded.BootParams
}

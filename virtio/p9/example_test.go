package p9_test

import (
	"log/slog"
	"os"

	"github.com/hugelgupf/p9/fsimpl/localfs"

	"github.com/gosandbox/sandbox/virtio/p9"
)

// A host directory shared with the guest under the mount tag "share"; the
// VMM adds dev to its virtio-pci bus (bus.AddVirtio(dev)), and the guest
// mounts it with
// mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 share /mnt.
func ExampleNew() {
	logger := slog.New(slog.DiscardHandler)
	dev, err := p9.New(p9.Options{
		Tag:        "share",
		Attacher:   localfs.Attacher(os.TempDir()),
		MaxMessage: 1 << 20,
		Logger:     logger,
	})
	if err != nil {
		panic(err)
	}
	defer dev.Close()
	_ = dev // bus.AddVirtio(dev)
	// Output:
}

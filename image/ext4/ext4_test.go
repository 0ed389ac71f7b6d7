package ext4

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func tool(t *testing.T, name string) string {
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s (apt-get install e2fsprogs) is required under CI=true", name)
		}
		t.Skipf("%s not installed (apt-get install e2fsprogs)", name)
	}
	return p
}

// TestFormatFsck formats file systems of several sizes (one group, several
// groups with sparse_super backups, a trimmed last group) and checks each
// with e2fsck -fn and debugfs from e2fsprogs.
func TestFormatFsck(t *testing.T) {
	fsck := tool(t, "e2fsck")
	debugfs := tool(t, "debugfs")
	for _, size := range []int64{MinSize, 100 << 20, 1 << 30, 4<<30 + 12345, 129<<20 + 4096*10} {
		p := filepath.Join(t.TempDir(), "upper.ext4")
		if err := CreateFile(p, size, Options{Time: 1700000000, Label: "upper", RootUID: 1000, RootGID: 1000}); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(fsck, "-fn", p).CombinedOutput()
		if err != nil {
			t.Fatalf("size %d: e2fsck: %v\n%s", size, err, out)
		}
		out, err = exec.Command(debugfs, "-R", "ls -l /", p).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "lost+found") {
			t.Fatalf("size %d: debugfs ls: %v\n%s", size, err, out)
		}
		st, _ := exec.Command(debugfs, "-R", "stat /", p).CombinedOutput()
		if !strings.Contains(string(st), "User:  1000") {
			t.Errorf("size %d: root owner not set:\n%s", size, st)
		}
		// Sparse: only metadata is allocated on the host.
		fi, _ := os.Stat(p)
		if fi.Size() < size-4096 {
			t.Errorf("size %d: file is %d bytes", size, fi.Size())
		}
	}
}

func TestFormatSizeErrors(t *testing.T) {
	if err := CreateFile(filepath.Join(t.TempDir(), "x"), 1<<20, Options{}); !errors.Is(err, ErrSize) {
		t.Fatalf("1 MiB: %v, want ErrSize", err)
	}
}

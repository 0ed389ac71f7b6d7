// Command testinit is the PID 1 of the Linux guests that package vmm's
// end-to-end tests boot: it records the boot phase, prints one line with the
// CPUs the kernel brought online, and powers the VM off (or, with
// GOSANDBOX_TEST_PANIC=1 on the kernel command line, exits so the kernel
// panics).
package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/vmm"
)

// Marker starts the line the init prints.
const Marker = "GOSANDBOX-TEST-INIT"

func writePort(v byte) {
	if f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0); err == nil {
		f.WriteAt([]byte{v}, vmm.BootPort)
		f.Close()
	}
}

func main() {
	os.MkdirAll("/dev", 0o755)
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	writePort(vmm.PhaseInitStarted)
	os.MkdirAll("/sys", 0o755)
	unix.Mount("sysfs", "/sys", "sysfs", 0, "")
	online, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		online = []byte("error:" + err.Error())
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	con, err := os.OpenFile("/dev/console", os.O_WRONLY, 0)
	if err != nil {
		con = os.Stdout
	}
	fmt.Fprintf(con, "\n%s cpus=%s kernel=%s\n", Marker, strings.TrimSpace(string(online)), bytes.TrimRight(uts.Release[:], "\x00"))
	if os.Getenv("GOSANDBOX_TEST_PANIC") == "1" {
		os.Exit(3) // PID 1 exiting panics the kernel
	}
	writePort(vmm.PhasePoweroff)
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}

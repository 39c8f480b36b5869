//go:build linux

package lossyfs

import (
	"os"
	"testing"
)

// Available reports why a lossy filesystem cannot be mounted here, or ""
// if it can: it needs root (to mount without fusermount) and /dev/fuse.
func Available() string {
	if os.Geteuid() != 0 {
		return "mounting the lossy FUSE filesystem needs root (mount(2) without fusermount)"
	}
	if f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0); err != nil {
		return "mounting the lossy FUSE filesystem needs /dev/fuse: " + err.Error()
	} else {
		f.Close()
	}
	return ""
}

// SkipUnlessAvailable skips t, saying what is missing, unless a lossy
// filesystem can be mounted.
func SkipUnlessAvailable(t testing.TB) {
	t.Helper()
	if why := Available(); why != "" {
		t.Skip(why)
	}
}

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// layout is what the tests know of a driver's directories under
// <root>/snapshots: where a snapshot's files are, and whether they are the
// whole tree or one layer.
type layout struct {
	// fsSub is the subdirectory of snapshots/<id> that holds the
	// snapshot's files ("" for the directory itself).
	fsSub string
	// wholeTree: a snapshot's files are its whole tree, its parents'
	// files included (nativesnap copies its parent); the driver's mounts
	// are binds of one such directory. Otherwise a snapshot's files are
	// its own layer only (overlaysnap), and the tree is an overlay mount
	// of the chain's layers, immediate parent first.
	wholeTree bool
}

// layouts are the drivers the tests know, by --driver name.
var layouts = map[string]layout{
	// examples/nativesnap: snapshots/<id> is the whole tree.
	"native": {wholeTree: true},
	// examples/overlaysnap: snapshots/<id>/fs is the snapshot's layer
	// (an active's upper directory), snapshots/<id>/work overlayfs's work
	// directory.
	"overlay": {fsSub: "fs"},
}

// fsDir is the directory of snapshot id's files.
func (e *env) fsDir(id string) string {
	return filepath.Join(e.root, "snapshots", id, e.layout.fsSub)
}

// chainDirs are the file directories of r and of its ancestors in recs,
// r's first: the lowerdir of an overlay mount of r's tree.
func (e *env) chainDirs(recs map[string]record, r record) []string {
	dirs := []string{e.fsDir(r.id)}
	for p := r.info.Parent; p != ""; p = recs[p].info.Parent {
		dirs = append(dirs, e.fsDir(recs[p].id))
		if len(dirs) > len(recs)+1 {
			break // a loop; Check reports it
		}
	}
	return dirs
}

// treeMount is a read-only mount of the whole tree of committed snapshot
// r: a bind of its directory when it holds the whole tree, an overlay of
// its chain's layers otherwise.
func (e *env) treeMount(recs map[string]record, r record) mnt {
	if e.layout.wholeTree {
		return mnt{typ: "bind", source: e.fsDir(r.id), options: []string{"rbind", "ro"}}
	}
	return mnt{typ: "overlay", source: "overlay", options: []string{"ro", "lowerdir=" + strings.Join(e.chainDirs(recs, r), ":")}}
}

// mnt is a mount as "ctr snapshots mounts" prints it.
type mnt struct {
	typ     string
	source  string
	options []string
}

// parseMount parses ctr's "mount -t TYPE SOURCE TARGET -o OPTIONS" line.
func parseMount(t *testing.T, out string) mnt {
	t.Helper()
	f := strings.Fields(out)
	require.Len(t, f, 7, "mount line: %q", out)
	require.Equal(t, []string{"mount", "-t", "-o"}, []string{f[0], f[1], f[5]}, "mount line: %q", out)
	return mnt{typ: f[2], source: f[3], options: strings.Split(f[6], ",")}
}

// option returns the value of the option key= of m ("" and false without).
func (m mnt) option(key string) (string, bool) {
	for _, o := range m.options {
		if v, ok := strings.CutPrefix(o, key+"="); ok {
			return v, true
		}
	}
	return "", false
}

// withTree calls fn with a directory showing m's tree. A bind's source is
// that directory already, and is used as it is (writes land where a
// container's would); an overlay is mounted below the test's directory for
// the duration of fn, read-only if m says "ro".
func (e *env) withTree(t *testing.T, m mnt, fn func(dir string)) {
	t.Helper()
	switch m.typ {
	case "bind":
		fn(m.source)
		return
	case "overlay":
	default:
		t.Fatalf("cannot mount %s", m.typ)
	}
	var (
		flags uintptr
		data  []string
	)
	for _, o := range m.options {
		switch o {
		case "ro":
			flags |= syscall.MS_RDONLY
		case "rw":
		default:
			data = append(data, o)
		}
	}
	e.mounts++
	target := filepath.Join(e.base, fmt.Sprintf("mnt-%d", e.mounts))
	require.NoError(t, os.Mkdir(target, 0o755))
	require.NoError(t, syscall.Mount(m.source, target, m.typ, flags, strings.Join(data, ",")), "mount %v", m)
	// Unmounted whatever fn does (a failed check ends the step with
	// runtime.Goexit); cleanupContainerd's unmountUnder is the last resort.
	defer func() {
		if err := syscall.Unmount(target, 0); err != nil {
			t.Errorf("unmount %s: %v", target, err)
			_ = syscall.Unmount(target, syscall.MNT_DETACH)
		}
		_ = os.Remove(target)
	}()
	fn(target)
}

// isWhiteout reports whether path is an overlayfs whiteout: a character
// device 0:0.
func isWhiteout(path string) bool {
	var st syscall.Stat_t
	return syscall.Lstat(path, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFCHR && st.Rdev == 0
}

//go:build linux

package lossyfs_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/snapmeta/storage/internal/lossyfs"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// mount returns a mounted lossy filesystem and its mountpoint, or skips
// saying what is missing.
func mount(t *testing.T) (*lossyfs.FS, string) {
	t.Helper()
	lossyfs.SkipUnlessAvailable(t)
	l, err := lossyfs.New(t.TempDir())
	require.NoError(t, err)
	mnt := t.TempDir()
	require.NoError(t, l.Mount(mnt))
	t.Cleanup(func() { assert.NoError(t, l.Unmount()) })
	return l, mnt
}

func syncDir(t *testing.T, dir string) {
	t.Helper()
	d, err := os.Open(dir)
	require.NoError(t, err)
	require.NoError(t, d.Sync())
	require.NoError(t, d.Close())
}

func writeFile(t *testing.T, path, data string, sync bool) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	require.NoError(t, err)
	_, err = f.WriteString(data)
	require.NoError(t, err)
	if sync {
		require.NoError(t, f.Sync())
	}
	require.NoError(t, f.Close())
}

// cut unmounts, cuts and mounts again, and returns what the cut dropped.
func cut(t *testing.T, l *lossyfs.FS, mnt string, keep func(int) int) lossyfs.CutResult {
	t.Helper()
	require.NoError(t, l.Unmount())
	res, err := l.Cut(keep)
	require.NoError(t, err)
	require.NoError(t, l.Mount(mnt))
	return res
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

// An unsynced write is really dropped by a cut, a synced one kept: this is
// what proves that writes reach the daemon (no FUSE passthrough, no
// writeback cache) and that no page cache hides the loss.
func TestCutDropsUnsyncedWritesKeepsSynced(t *testing.T) {
	l, mnt := mount(t)
	synced, unsynced := filepath.Join(mnt, "synced"), filepath.Join(mnt, "unsynced")

	writeFile(t, synced, "durable;", true)
	syncDir(t, mnt)
	writeFile(t, synced, "lost;", false)  // after the last fsync
	writeFile(t, unsynced, "lost;", true) // synced, but its name is not
	require.Equal(t, "durable;lost;", read(t, synced), "before the cut, the writes are visible")
	assert.Greater(t, l.Stats().Writes, 2, "the daemon must see every write (no passthrough)")

	res := cut(t, l, mnt, nil)
	assert.Equal(t, "durable;", read(t, synced), "the unsynced append survived the cut")
	_, err := os.Stat(unsynced)
	assert.ErrorIs(t, err, os.ErrNotExist, "a file whose directory was never synced survived the cut")
	assert.Equal(t, 1, res.DroppedWrites, "the append to synced")
	assert.Equal(t, 1, res.DroppedDirOps, "the creation of unsynced")
	// The backing directory (the disk) agrees.
	b, err := os.ReadFile(filepath.Join(l.Backing(), "synced"))
	require.NoError(t, err)
	assert.Equal(t, "durable;", string(b))

	// After the cut the filesystem works as before, and a synced name stays.
	writeFile(t, unsynced, "now durable", true)
	syncDir(t, mnt)
	cut(t, l, mnt, nil)
	assert.Equal(t, "now durable", read(t, unsynced))
}

// A truncation, a rename and an unlink since the last sync are undone.
func TestCutUndoesTruncateRenameUnlink(t *testing.T) {
	l, mnt := mount(t)
	a, b, c := filepath.Join(mnt, "a"), filepath.Join(mnt, "b"), filepath.Join(mnt, "c")
	writeFile(t, a, "aaaa", true)
	writeFile(t, b, "bbbb", true)
	writeFile(t, c, "cccc", true)
	syncDir(t, mnt)

	require.NoError(t, os.Truncate(a, 1))
	require.NoError(t, os.Rename(b, a)) // replaces a
	require.NoError(t, os.Remove(c))
	f, err := os.OpenFile(filepath.Join(mnt, "a"), os.O_WRONLY|os.O_TRUNC, 0)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	res := cut(t, l, mnt, nil)
	assert.Equal(t, "aaaa", read(t, a))
	assert.Equal(t, "bbbb", read(t, b))
	assert.Equal(t, "cccc", read(t, c))
	assert.Equal(t, 2, res.DroppedWrites)
	assert.Equal(t, 2, res.DroppedDirOps)
}

// A torn cut keeps a prefix of the last unsynced write, and nothing of the
// ones before it.
func TestCutTearsLastWrite(t *testing.T) {
	l, mnt := mount(t)
	p := filepath.Join(mnt, "f")
	writeFile(t, p, "0123", true)
	syncDir(t, mnt)
	writeFile(t, p, "first;", false)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte("WXYZ"), 0)
	assert.NoError(t, err)
	require.NoError(t, f.Close())

	res := cut(t, l, mnt, func(n int) int {
		assert.Equal(t, 4, n)
		return 2
	})
	assert.Equal(t, "WX23", read(t, p))
	assert.True(t, res.Torn)
	assert.Equal(t, 2, res.TornKept)
	assert.Equal(t, 1, l.Stats().TornWrites)
}

//go:build linux

// Package lossyfs is a FUSE filesystem for tests that simulates a power cut.
//
// It passes every operation through to a backing directory, and remembers
// how to undo whatever is not yet durable: the writes, truncations and
// allocations of a file since its last fsync (or fdatasync), and the
// creations, removals and renames in a directory since that directory's
// last fsync. Cut undoes all of it, as a power cut does to the page cache
// and to a disk's volatile write cache, and may keep a prefix of the last
// unsynced write (a torn write). What survives a Cut is exactly what an
// application made durable by the POSIX rules, and nothing more.
//
// Honesty of the simulation rests on three points:
//
//   - Every write reaches the daemon. File handles never offer a
//     passthrough fd (on Linux 6.9 and later go-fuse's loopback files
//     would, and the kernel would then write to the backing file behind
//     the daemon's back), and the writeback cache is not enabled, so a
//     write(2) returns only after the daemon has recorded it.
//   - Cut works on an unmounted filesystem: the mount, and with it the
//     kernel's page cache of its files, is gone before the backing
//     directory is rolled back, so nothing cached can hide the loss.
//     Mount again to use the state after the cut.
//   - The backing directory itself is the "disk": fsync is recorded, not
//     forwarded (the test never loses power for real), which keeps syncs
//     cheap.
//
// Not modelled: hard links, symlinks and device nodes (refused with
// ENOTSUP), extended attributes, and reordering among unsynced writes
// other than the torn last one.
package lossyfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// FS is a lossy filesystem over a backing directory. It may be mounted,
// unmounted, cut and mounted again any number of times.
type FS struct {
	data, trash string

	mu      sync.Mutex
	server  *fuse.Server
	mnt     string
	conn    uint32 // the FUSE connection's number, for aborting it
	seq     uint64
	files   map[uint64]*fileLog // by backing inode number
	dirOps  []*dirOp            // not yet durable, oldest first
	trashed int
	stats   Stats
}

// Stats counts what the filesystem saw and what cuts dropped.
type Stats struct {
	Writes, Fsyncs, DirFsyncs int   // operations seen by the daemon
	DroppedWrites             int   // writes, truncations and allocations undone by cuts
	DroppedBytes              int64 // bytes those writes had written
	DroppedDirOps             int   // creations, removals and renames undone by cuts
	TornWrites                int   // last writes of which a cut kept a prefix
	TornBytes                 int64 // bytes kept of torn writes
}

// fileLog is how to undo a file's changes since its last fsync.
type fileLog struct {
	f    *os.File // read-write on the backing file, kept for the undo
	undo []undoRec
}

// undoRec restores one change: the bytes at off were old (shorter than the
// change where the file was shorter), the file's size was size.
type undoRec struct {
	seq  uint64
	off  int64
	old  []byte
	size int64
	data []byte // what a write wrote, for a torn write; nil otherwise
}

// dirOp is a directory operation not yet durable: it is undone by a cut
// unless every directory it changed was fsynced after it.
type dirOp struct {
	kind     string          // "create", "mkdir", "unlink", "rmdir", "rename"
	path, to string          // relative to the root; to: of a rename
	trash    string          // where an unlinked file or a replaced rename target went
	dirs     map[uint64]bool // directories changed, not yet synced since
}

// New returns a lossy filesystem whose state lives under dir: dir/data
// is the backing directory (the disk), dir/trash keeps removed files so
// that a cut can bring them back. dir must not be inside the mount.
func New(dir string) (*FS, error) {
	l := &FS{data: filepath.Join(dir, "data"), trash: filepath.Join(dir, "trash"), files: map[uint64]*fileLog{}}
	for _, d := range []string{l.data, l.trash} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// Backing is the backing directory: what is on the disk. Read it only
// while unmounted, or after a Cut, to see what survived.
func (l *FS) Backing() string { return l.data }

// Stats returns the counts so far.
func (l *FS) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stats
}

// Mount mounts the filesystem at mountpoint (which must exist). It needs
// root (or CAP_SYS_ADMIN) and /dev/fuse: it mounts with mount(2) itself,
// as no fusermount is assumed.
func (l *FS) Mount(mountpoint string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.server != nil {
		return errors.New("lossyfs: already mounted")
	}
	root := &fs.LoopbackRoot{Path: l.data}
	var st syscall.Stat_t
	if err := syscall.Stat(l.data, &st); err != nil {
		return err
	}
	root.Dev = st.Dev
	root.NewNode = func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
		return &node{LoopbackNode: fs.LoopbackNode{RootData: r}, l: l}
	}
	root.RootNode = root.NewNode(root, nil, "", &st)
	zero := time.Duration(0)
	server, err := fs.Mount(mountpoint, root.RootNode, &fs.Options{
		MountOptions: fuse.MountOptions{
			DirectMount:       true,
			DirectMountStrict: true,
			FsName:            "lossyfs",
			Name:              "lossyfs",
		},
		// No caching of names or attributes in the kernel: every lookup
		// sees the daemon's (the backing directory's) state.
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
	})
	if err != nil {
		return fmt.Errorf("lossyfs: mount %s: %w", mountpoint, err)
	}
	l.server, l.mnt = server, mountpoint
	if err := syscall.Stat(mountpoint, &st); err == nil {
		l.conn = unix.Minor(st.Dev)
	}
	return nil
}

// Unmount unmounts the filesystem and waits for its server to stop. Every
// process using it must have closed its files (a killed process has).
func (l *FS) Unmount() error {
	l.mu.Lock()
	server := l.server
	l.server = nil
	l.mu.Unlock()
	if server == nil {
		return nil
	}
	var err error
	for range 50 { // a killed process's files may take a moment to be released
		if err = server.Unmount(); err == nil {
			server.Wait()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Something still has a file open (a failed test, say). A plain
	// detach would leave the process unable to exit, blocked on a
	// filesystem nobody serves: abort the connection first, so that every
	// access fails instead, then detach.
	abortErr := l.abort()
	detachErr := syscall.Unmount(l.mnt, syscall.MNT_DETACH)
	server.Wait()
	return errors.Join(fmt.Errorf("lossyfs: unmount: %w (connection aborted and mount detached)", err), abortErr, detachErr)
}

// abort aborts the FUSE connection through the fusectl filesystem,
// mounting it if needed.
func (l *FS) abort() error {
	const ctl = "/sys/fs/fuse/connections"
	path := filepath.Join(ctl, strconv.FormatUint(uint64(l.conn), 10), "abort")
	if _, err := os.Stat(path); err != nil {
		_ = syscall.Mount("fusectl", ctl, "fusectl", 0, "")
	}
	return os.WriteFile(path, []byte("1"), 0)
}

// CutResult says what one Cut dropped.
type CutResult struct {
	DroppedWrites, DroppedDirOps int
	DroppedBytes                 int64
	// Torn is whether a prefix of the last unsynced write was kept, and
	// TornKept how many bytes of it.
	Torn     bool
	TornKept int
}

// Cut simulates a power cut on the unmounted filesystem: every change not
// made durable is undone. If keep is not nil, it is given the length of
// the last unsynced write (the one in flight when power went) and returns
// how many of its first bytes reach the disk anyway (0 to the length).
func (l *FS) Cut(keep func(n int) int) (CutResult, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.server != nil {
		return CutResult{}, errors.New("lossyfs: Cut while mounted: the kernel's page cache would hide the loss")
	}
	var res CutResult

	// The last unsynced write, over every file.
	var last *undoRec
	var lastFile *os.File
	for _, fl := range l.files {
		for i := range fl.undo {
			if u := &fl.undo[i]; u.data != nil && (last == nil || u.seq > last.seq) {
				last, lastFile = u, fl.f
			}
		}
	}

	// File contents first, through descriptors that do not depend on names,
	// then the names, newest first.
	var errs []error
	for ino, fl := range l.files {
		for i := len(fl.undo) - 1; i >= 0; i-- {
			u := fl.undo[i]
			if len(u.old) > 0 {
				if _, err := fl.f.WriteAt(u.old, u.off); err != nil {
					errs = append(errs, err)
				}
			}
			if err := fl.f.Truncate(u.size); err != nil {
				errs = append(errs, err)
			}
			res.DroppedWrites++
			res.DroppedBytes += int64(len(u.data))
		}
		if last != nil && lastFile == fl.f && keep != nil {
			if k := min(max(keep(len(last.data)), 0), len(last.data)); k > 0 {
				if _, err := fl.f.WriteAt(last.data[:k], last.off); err != nil {
					errs = append(errs, err)
				}
				res.Torn, res.TornKept = true, k
			}
		}
		errs = append(errs, fl.f.Close())
		delete(l.files, ino)
	}
	for i := len(l.dirOps) - 1; i >= 0; i-- {
		errs = append(errs, l.undoDirOp(l.dirOps[i]))
		res.DroppedDirOps++
	}
	l.dirOps = nil

	l.stats.DroppedWrites += res.DroppedWrites
	l.stats.DroppedBytes += res.DroppedBytes
	l.stats.DroppedDirOps += res.DroppedDirOps
	if res.Torn {
		l.stats.TornWrites++
		l.stats.TornBytes += int64(res.TornKept)
	}
	return res, errors.Join(errs...)
}

func (l *FS) undoDirOp(op *dirOp) error {
	p := filepath.Join(l.data, op.path)
	switch op.kind {
	case "create", "mkdir":
		return os.RemoveAll(p)
	case "unlink":
		return os.Rename(op.trash, p)
	case "rmdir":
		return os.Mkdir(p, 0o700)
	case "rename":
		to := filepath.Join(l.data, op.to)
		if err := os.Rename(to, p); err != nil {
			return err
		}
		if op.trash != "" {
			return os.Rename(op.trash, to)
		}
	}
	return nil
}

// toTrash moves the backing path p out of the tree, where a cut can find
// it again.
func (l *FS) toTrash(p string) (string, error) {
	l.trashed++
	t := filepath.Join(l.trash, strconv.Itoa(l.trashed))
	return t, os.Rename(p, t)
}

// record notes that the file open as f (inode ino) is about to change
// over [off, off+n) (n < 0: from off to the end, a truncation to off) and
// keeps what undoes it. l.mu is held.
func (l *FS) record(ino uint64, f *os.File, off int64, n int64, data []byte) error {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	end := off + n
	if n < 0 {
		end = st.Size
	}
	var old []byte
	if from, to := off, min(end, st.Size); to > from {
		old = make([]byte, to-from)
		if _, err := f.ReadAt(old, from); err != nil {
			return err
		}
	}
	fl := l.files[ino]
	if fl == nil {
		// A descriptor of our own: the caller's may be closed before the
		// cut, and this one reaches the inode whatever its name becomes.
		fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		fl = &fileLog{f: os.NewFile(uintptr(fd), "undo")}
		l.files[ino] = fl
	}
	l.seq++
	if data != nil {
		data = append([]byte{}, data...)
	}
	fl.undo = append(fl.undo, undoRec{seq: l.seq, off: off, old: old, size: st.Size, data: data})
	l.stats.Writes++
	return nil
}

// fsync makes the file's changes durable.
func (l *FS) fsync(ino uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stats.Fsyncs++
	if fl := l.files[ino]; fl != nil {
		_ = fl.f.Close()
		delete(l.files, ino)
	}
}

// fsyncDir makes the directory's entries durable: an operation is durable
// once every directory it changed has been synced after it.
func (l *FS) fsyncDir(ino uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stats.DirFsyncs++
	kept := l.dirOps[:0]
	for _, op := range l.dirOps {
		delete(op.dirs, ino)
		if len(op.dirs) > 0 {
			kept = append(kept, op)
		}
	}
	clear(l.dirOps[len(kept):])
	l.dirOps = kept
}

func inoOf(p string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

func inoOfFile(f *os.File) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// node is a loopback node whose changes are recorded. Everything not
// overridden here only reads, or is refused.
type node struct {
	fs.LoopbackNode
	l *FS
}

func (n *node) rel() string  { return n.Path(n.Root()) }
func (n *node) full() string { return filepath.Join(n.l.data, n.rel()) }

func (n *node) dirIno() (uint64, error) { return inoOf(n.full()) }

// addDirOp records op, which changed the directories dirs.
func (n *node) addDirOp(op *dirOp, dirs ...uint64) {
	op.dirs = map[uint64]bool{}
	for _, d := range dirs {
		op.dirs[d] = true
	}
	n.l.dirOps = append(n.l.dirOps, op)
}

var (
	_ fs.NodeOpener    = (*node)(nil)
	_ fs.NodeCreater   = (*node)(nil)
	_ fs.NodeMkdirer   = (*node)(nil)
	_ fs.NodeUnlinker  = (*node)(nil)
	_ fs.NodeRmdirer   = (*node)(nil)
	_ fs.NodeRenamer   = (*node)(nil)
	_ fs.NodeSetattrer = (*node)(nil)
	_ fs.NodeFsyncer   = (*node)(nil)
	_ fs.NodeLinker    = (*node)(nil)
	_ fs.NodeSymlinker = (*node)(nil)
	_ fs.NodeMknoder   = (*node)(nil)
)

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	flags &^= syscall.O_APPEND | fuse.FMODE_EXEC
	trunc := flags&syscall.O_TRUNC != 0
	flags &^= syscall.O_TRUNC
	if flags&syscall.O_ACCMODE == syscall.O_WRONLY {
		// Recording a write reads what it overwrites.
		flags = flags&^syscall.O_ACCMODE | syscall.O_RDWR
	}
	f, err := os.OpenFile(n.full(), int(flags)|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, 0, fs.ToErrno(err)
	}
	h, err := n.l.newHandle(f)
	if err != nil {
		f.Close()
		return nil, 0, fs.ToErrno(err)
	}
	if trunc { // a truncation like any other: undone unless synced
		if errno := h.truncate(0); errno != 0 {
			f.Close()
			return nil, 0, errno
		}
	}
	return h, 0, 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	n.l.mu.Lock()
	defer n.l.mu.Unlock()
	dir, err := n.dirIno()
	if err != nil {
		return nil, nil, 0, fs.ToErrno(err)
	}
	p := filepath.Join(n.full(), name)
	if _, err := os.Lstat(p); err == nil {
		// The kernel opens an existing file with FUSE_OPEN, not CREATE;
		// refuse rather than truncate behind the record.
		return nil, nil, 0, syscall.EEXIST
	}
	ch, fh, fuseFlags, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	lf := fh.(*fs.LoopbackFile)
	// The loopback handle would offer a passthrough fd: replace it by ours,
	// on a descriptor of the same file.
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	_ = lf.Release(ctx)
	if err != nil {
		return nil, nil, 0, fs.ToErrno(err)
	}
	h, err := n.l.newHandle(os.NewFile(uintptr(fd), p))
	if err != nil {
		return nil, nil, 0, fs.ToErrno(err)
	}
	n.addDirOp(&dirOp{kind: "create", path: filepath.Join(n.rel(), name)}, dir)
	return ch, h, fuseFlags, 0
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.l.mu.Lock()
	defer n.l.mu.Unlock()
	dir, err := n.dirIno()
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	ch, errno := n.LoopbackNode.Mkdir(ctx, name, mode, out)
	if errno == 0 {
		n.addDirOp(&dirOp{kind: "mkdir", path: filepath.Join(n.rel(), name)}, dir)
	}
	return ch, errno
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	n.l.mu.Lock()
	defer n.l.mu.Unlock()
	dir, err := n.dirIno()
	if err != nil {
		return fs.ToErrno(err)
	}
	p := filepath.Join(n.full(), name)
	if st, err := os.Lstat(p); err != nil {
		return fs.ToErrno(err)
	} else if st.IsDir() {
		return syscall.EISDIR
	}
	t, err := n.l.toTrash(p)
	if err != nil {
		return fs.ToErrno(err)
	}
	n.addDirOp(&dirOp{kind: "unlink", path: filepath.Join(n.rel(), name), trash: t}, dir)
	return 0
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	n.l.mu.Lock()
	defer n.l.mu.Unlock()
	dir, err := n.dirIno()
	if err != nil {
		return fs.ToErrno(err)
	}
	errno := n.LoopbackNode.Rmdir(ctx, name)
	if errno == 0 {
		n.addDirOp(&dirOp{kind: "rmdir", path: filepath.Join(n.rel(), name)}, dir)
	}
	return errno
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	if flags != 0 {
		return syscall.ENOTSUP // RENAME_EXCHANGE, RENAME_NOREPLACE: not modelled
	}
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	n.l.mu.Lock()
	defer n.l.mu.Unlock()
	from, err := n.dirIno()
	if err != nil {
		return fs.ToErrno(err)
	}
	to, err := np.dirIno()
	if err != nil {
		return fs.ToErrno(err)
	}
	p1, p2 := filepath.Join(n.full(), name), filepath.Join(np.full(), newName)
	if _, err := os.Lstat(p1); err != nil {
		return fs.ToErrno(err)
	}
	op := &dirOp{kind: "rename", path: filepath.Join(n.rel(), name), to: filepath.Join(np.rel(), newName)}
	if st, err := os.Lstat(p2); err == nil {
		if st.IsDir() {
			return syscall.ENOTSUP // replacing a directory: not modelled
		}
		if op.trash, err = n.l.toTrash(p2); err != nil {
			return fs.ToErrno(err)
		}
	}
	if err := os.Rename(p1, p2); err != nil {
		if op.trash != "" {
			_ = os.Rename(op.trash, p2)
		}
		return fs.ToErrno(err)
	}
	n.addDirOp(op, from, to)
	return 0
}

func (n *node) Link(context.Context, fs.InodeEmbedder, string, *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.ENOTSUP
}

func (n *node) Symlink(context.Context, string, string, *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.ENOTSUP
}

func (n *node) Mknod(context.Context, string, uint32, uint32, *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.ENOTSUP
}

// Setattr records a truncation, made through a handle or by name.
func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if h, ok := f.(*handle); ok {
		return h.Setattr(ctx, in, out)
	}
	if sz, ok := in.GetSize(); ok {
		file, err := os.OpenFile(n.full(), os.O_RDWR|syscall.O_NOFOLLOW, 0)
		if err != nil {
			return fs.ToErrno(err)
		}
		defer file.Close()
		h, err := n.l.newHandle(file)
		if err != nil {
			return fs.ToErrno(err)
		}
		if errno := h.truncate(int64(sz)); errno != 0 {
			return errno
		}
		in.Valid &^= fuse.FATTR_SIZE
	}
	return n.LoopbackNode.Setattr(ctx, nil, in, out)
}

// Fsync without a handle, and fsync of a directory (FsyncDir falls back
// to the node's Fsync).
func (n *node) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if h, ok := f.(*handle); ok {
		return h.Fsync(ctx, flags)
	}
	ino, err := inoOf(n.full())
	if err != nil {
		return fs.ToErrno(err)
	}
	if n.IsDir() {
		n.l.fsyncDir(ino)
	} else {
		n.l.fsync(ino)
	}
	return 0
}

// dirHandle is an open directory: the loopback's, except that its fsync
// is recorded (the loopback's would only fsync the backing directory).
type dirHandle struct {
	l   *FS
	ino uint64
	ds  fs.FileHandle
}

var (
	_ fs.FileReaddirenter = (*dirHandle)(nil)
	_ fs.FileSeekdirer    = (*dirHandle)(nil)
	_ fs.FileReleasedirer = (*dirHandle)(nil)
	_ fs.FileFsyncdirer   = (*dirHandle)(nil)
)

func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	ino, err := inoOf(n.full())
	if err != nil {
		return nil, 0, fs.ToErrno(err)
	}
	ds, fuseFlags, errno := n.LoopbackNode.OpendirHandle(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &dirHandle{l: n.l, ino: ino, ds: ds}, fuseFlags, 0
}

func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	return d.ds.(fs.FileReaddirenter).Readdirent(ctx)
}

func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	return d.ds.(fs.FileSeekdirer).Seekdir(ctx, off)
}

func (d *dirHandle) Releasedir(ctx context.Context, flags uint32) {
	d.ds.(fs.FileReleasedirer).Releasedir(ctx, flags)
}

func (d *dirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	d.l.fsyncDir(d.ino)
	return 0
}

// handle is an open file. It deliberately does not embed fs.LoopbackFile:
// that would bring PassthroughFd, and with it writes that bypass the
// daemon.
type handle struct {
	l   *FS
	f   *os.File
	lf  *fs.LoopbackFile // for the operations that only read
	ino uint64
}

func (l *FS) newHandle(f *os.File) (*handle, error) {
	ino, err := inoOfFile(f)
	if err != nil {
		return nil, err
	}
	// lf shares f: it is released (and f closed) once, by Release.
	return &handle{l: l, f: f, lf: fs.NewLoopbackFileFromOS(f), ino: ino}, nil
}

var (
	_ fs.FileReader    = (*handle)(nil)
	_ fs.FileWriter    = (*handle)(nil)
	_ fs.FileFsyncer   = (*handle)(nil)
	_ fs.FileFlusher   = (*handle)(nil)
	_ fs.FileReleaser  = (*handle)(nil)
	_ fs.FileGetattrer = (*handle)(nil)
	_ fs.FileSetattrer = (*handle)(nil)
	_ fs.FileAllocater = (*handle)(nil)
	_ fs.FileLseeker   = (*handle)(nil)
)

func (h *handle) Read(ctx context.Context, buf []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return h.lf.Read(ctx, buf, off)
}

func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	h.l.mu.Lock()
	defer h.l.mu.Unlock()
	if err := h.l.record(h.ino, h.f, off, int64(len(data)), data); err != nil {
		return 0, fs.ToErrno(err)
	}
	n, err := h.f.WriteAt(data, off)
	return uint32(n), fs.ToErrno(err)
}

func (h *handle) truncate(size int64) syscall.Errno {
	h.l.mu.Lock()
	defer h.l.mu.Unlock()
	if err := h.l.record(h.ino, h.f, size, -1, nil); err != nil {
		return fs.ToErrno(err)
	}
	return fs.ToErrno(h.f.Truncate(size))
}

func (h *handle) Setattr(ctx context.Context, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok {
		if errno := h.truncate(int64(sz)); errno != 0 {
			return errno
		}
		in.Valid &^= fuse.FATTR_SIZE
	}
	return h.lf.Setattr(ctx, in, out)
}

func (h *handle) Allocate(ctx context.Context, off uint64, size uint64, mode uint32) syscall.Errno {
	h.l.mu.Lock()
	defer h.l.mu.Unlock()
	// Allocation does not change bytes that exist; undoing it restores the
	// size (and leaves the blocks allocated, which nobody can see).
	if err := h.l.record(h.ino, h.f, int64(off), 0, nil); err != nil {
		return fs.ToErrno(err)
	}
	return h.lf.Allocate(ctx, off, size, mode)
}

func (h *handle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if st, err := h.f.Stat(); err == nil && st.IsDir() {
		h.l.fsyncDir(h.ino)
	} else {
		h.l.fsync(h.ino)
	}
	return 0
}

func (h *handle) Flush(ctx context.Context) syscall.Errno   { return h.lf.Flush(ctx) }
func (h *handle) Release(ctx context.Context) syscall.Errno { return h.lf.Release(ctx) }
func (h *handle) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	return h.lf.Getattr(ctx, out)
}
func (h *handle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	return h.lf.Lseek(ctx, off, whence)
}

package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"runtime/debug"
	"sync"

	bolt "go.etcd.io/bbolt"
)

// Damaged bbolt files.
//
// bbolt trusts its file: a page that is not what its parent says, a page
// id beyond the end of the file or a truncated file make it panic
// ("assertion failed", "slice bounds out of range"), or fault in its
// memory map (SIGSEGV, SIGBUS), which kills the process. A store on a
// damaged file must instead fail with an error a caller can act on. Three
// defences:
//
//   - Before bbolt maps a file, checkBoltFile reads the two meta pages and
//     refuses a file bbolt would misread at once: no valid meta page, or a
//     meta page whose root, freelist or high-water mark lies outside the
//     file (a truncated file).
//   - Once bbolt has opened it, treeDamage reads the whole tree
//     (bolt_pages.go): a tree that would take bbolt outside the file,
//     down a cycle, or through more than maxInlineNesting inline buckets
//     one inside another is refused, and one that is otherwise not as
//     bbolt writes it opens for reads only.
//   - Every engine call into bbolt runs under boltGuard: a deferred recover,
//     with debug.SetPanicOnFault on for the call so that a fault in the map
//     becomes a panic too. A panic becomes an ErrDamaged error. One guard
//     per engine call, not per key.
//
// A panic inside a writable transaction leaves bbolt's in-memory state
// (nodes, freelist) unknown, so that transaction is never committed and
// the store refuses every later write (ErrDamaged); reads go on.

// damagedErr says that the file at path is damaged, why, and what to do.
func damagedErr(path string, cause any) error {
	return fmt.Errorf("%s: %v (%s): %w", path, cause, salvageHint(path), ErrDamaged)
}

// salvageHint says what to do with the damaged file at path.
func salvageHint(path string) string {
	return fmt.Sprintf("copy what can still be read with 'snapmeta salvage --from %s --to NEW'", path)
}

// bbolt's on-disk meta page (go.etcd.io/bbolt/internal/common): a 16-byte
// page header (id, flags, count, overflow), then the meta: magic, version,
// page size, flags (4 bytes each), the root bucket (root pgid, sequence),
// freelist pgid, high-water mark pgid, txid and an FNV-64a checksum of the
// meta bytes before it. Little-endian on every platform this package
// builds for.
const (
	boltPageHeaderSize = 16
	boltMagic          = 0xED0CDAED
	boltVersion        = 2
	boltMetaChecksumAt = 56 // offset of the checksum within the meta
	boltMetaSize       = boltMetaChecksumAt + 8
	boltNoFreelist     = ^uint64(0)
	boltFreelistFlag   = 0x10
	boltMinPageSize    = 1024
	boltMaxPageSize    = 1024 << 14 // the largest bbolt looks for
)

type boltMeta struct {
	pageSize           uint32
	root, freelist, hw uint64
	txid               uint64
}

// parseBoltMeta decodes the meta page at the start of p, or says why it is
// not one (bbolt's Meta.Validate).
func parseBoltMeta(p []byte) (boltMeta, error) {
	if len(p) < boltPageHeaderSize+boltMetaSize {
		return boltMeta{}, errors.New("meta page cut short")
	}
	m := p[boltPageHeaderSize : boltPageHeaderSize+boltMetaSize]
	le := binary.LittleEndian
	if le.Uint32(m[0:]) != boltMagic {
		return boltMeta{}, errors.New("meta page has no bbolt magic")
	}
	if le.Uint32(m[4:]) != boltVersion {
		return boltMeta{}, fmt.Errorf("meta page has version %d, not %d", le.Uint32(m[4:]), boltVersion)
	}
	h := fnv.New64a()
	_, _ = h.Write(m[:boltMetaChecksumAt])
	if h.Sum64() != le.Uint64(m[boltMetaChecksumAt:]) {
		return boltMeta{}, errors.New("meta page checksum mismatch")
	}
	return boltMeta{
		pageSize: le.Uint32(m[8:]),
		root:     le.Uint64(m[16:]),
		freelist: le.Uint64(m[32:]),
		hw:       le.Uint64(m[40:]),
		txid:     le.Uint64(m[48:]),
	}, nil
}

// checkBoltFile refuses a file bbolt would misread at once: it has no
// valid meta page, or the meta page bbolt would use (the valid one with the
// higher txid, as bbolt chooses) names a root, a freelist or a high-water
// mark outside the file, or a freelist page that does not fit in it. A
// missing or empty file is fine: bbolt creates it. It reads three pages;
// it never writes. The checks only refuse what no bbolt commit leaves
// behind: bbolt grows the file past the high-water mark before it writes
// the meta page that names it.
func checkBoltFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return nil // bbolt reports it (or creates the file)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || st.Size() == 0 {
		return nil
	}
	size := st.Size()
	readAt := func(off int64, n int) []byte {
		buf := make([]byte, n)
		k, _ := f.ReadAt(buf, off)
		return buf[:k]
	}
	// The page size comes from a valid meta page: the first, or else the
	// second, at one of the offsets bbolt tries.
	head := readAt(0, 4096)
	m0, err0 := parseBoltMeta(head)
	pageSize := int64(m0.pageSize)
	if err0 != nil {
		pageSize = 0
		for pos := int64(boltMinPageSize); pos <= boltMaxPageSize && pos < size-boltMinPageSize; pos <<= 1 {
			if m, err := parseBoltMeta(readAt(pos, boltPageHeaderSize+boltMetaSize)); err == nil && int64(m.pageSize) == pos {
				pageSize = pos
				break
			}
		}
		if pageSize == 0 {
			return damagedErr(path, fmt.Errorf("neither meta page is valid (first: %v)", err0))
		}
	}
	if pageSize < boltMinPageSize || pageSize > boltMaxPageSize || pageSize&(pageSize-1) != 0 {
		return damagedErr(path, fmt.Errorf("meta page gives page size %d", pageSize))
	}
	if size < 2*pageSize {
		return damagedErr(path, fmt.Errorf("file of %d bytes is shorter than its two meta pages of %d bytes", size, pageSize))
	}
	m1, err1 := parseBoltMeta(readAt(pageSize, boltPageHeaderSize+boltMetaSize))
	m := m0
	switch {
	case err0 != nil && err1 != nil:
		return damagedErr(path, fmt.Errorf("neither meta page is valid (%v; %v)", err0, err1))
	case err0 != nil, err1 == nil && m1.txid > m0.txid:
		m = m1
	}
	pages := uint64(size / pageSize)
	switch {
	case int64(m.pageSize) != pageSize:
		return damagedErr(path, fmt.Errorf("meta pages disagree on the page size (%d, %d)", pageSize, m.pageSize))
	case m.hw < 3 || m.hw > pages:
		return damagedErr(path, fmt.Errorf("the file holds %d pages of %d bytes (%d bytes), but its meta page (txid %d) says %d are in use: it was cut short", pages, pageSize, size, m.txid, m.hw))
	case m.root < 2 || m.root >= m.hw:
		return damagedErr(path, fmt.Errorf("the root page %d lies outside the pages in use (2..%d)", m.root, m.hw-1))
	case m.freelist == boltNoFreelist:
	case m.freelist < 2 || m.freelist >= m.hw:
		return damagedErr(path, fmt.Errorf("the freelist page %d lies outside the pages in use (2..%d)", m.freelist, m.hw-1))
	default:
		// bbolt reads the freelist at open: its ids must lie in the file.
		fp := readAt(int64(m.freelist)*pageSize, boltPageHeaderSize+8)
		if len(fp) < boltPageHeaderSize+8 {
			return damagedErr(path, errors.New("the freelist page is cut short"))
		}
		le := binary.LittleEndian
		flags, count, overflow := le.Uint16(fp[8:]), uint64(le.Uint16(fp[10:])), uint64(le.Uint32(fp[12:]))
		if flags&boltFreelistFlag == 0 {
			return damagedErr(path, fmt.Errorf("page %d is not a freelist page (flags %#x)", m.freelist, flags))
		}
		if count == 0xFFFF { // the true count is the first id slot
			count = le.Uint64(fp[boltPageHeaderSize:]) + 1
		}
		if m.freelist+overflow >= m.hw || boltPageHeaderSize+8*count > (overflow+1)*uint64(pageSize) {
			return damagedErr(path, fmt.Errorf("the freelist (page %d, %d overflow pages, %d ids) does not fit in the pages in use", m.freelist, overflow, count))
		}
	}
	return nil
}

// boltGuard is deferred by every engine call into bbolt:
//
//	prev := debug.SetPanicOnFault(true)
//	defer e.guard(prev, writable, &err, nil)
//
// It restores the goroutine's fault setting and turns a panic of bbolt
// into an ErrDamaged error in *errp. inCallback, when not nil, is set
// while the call runs the caller's function (a scan's fn): a panic then is
// the caller's own and goes on unchanged. A panic in a writable
// transaction marks the store damaged for writes (see markDamaged).
func (e *boltEngine) guard(prev bool, tx *boltTx, errp *error, inCallback *bool) {
	debug.SetPanicOnFault(prev)
	if inCallback != nil && *inCallback {
		return // not recovered: the caller's panic goes on
	}
	p := recover()
	if p == nil {
		return
	}
	err := damagedErr(e.path, fmt.Sprintf("bbolt failed reading or writing it: %v", p))
	if tx != nil && tx.writable {
		tx.broken = err
		e.markDamaged(fmt.Errorf("an earlier write met the damage: %w", err))
	}
	*errp = err
}

// markDamaged refuses every later write of the store with err: bbolt's
// writer state after a panic is unknown, and committing it could spread
// the damage. Reads may go on.
func (e *boltEngine) markDamaged(err error) {
	e.damaged.CompareAndSwap(nil, &err)
}

// writeRefusal is the error a write gets on a store marked damaged.
func (e *boltEngine) writeRefusal() error {
	if p := e.damaged.Load(); p != nil {
		return fmt.Errorf("writes refused: %w", *p)
	}
	return nil
}

// openBolt runs bolt.Open so that a panic or a fault in it (bbolt reads the
// meta pages and the freelist at open) becomes an ErrDamaged error rather
// than a crash. The file bbolt opened is then closed, releasing its lock;
// its memory map, if any, stays (bbolt gives no way to reach it).
func openBolt(path string, options *bolt.Options) (db *bolt.DB, err error) {
	var mu sync.Mutex
	var files []*os.File
	openFile := options.OpenFile
	if openFile == nil {
		openFile = os.OpenFile
	}
	opts := *options
	opts.OpenFile = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		f, err := openFile(name, flag, perm)
		if f != nil {
			mu.Lock()
			files = append(files, f)
			mu.Unlock()
		}
		return f, err
	}
	prev := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(prev)
		if p := recover(); p != nil {
			mu.Lock()
			for _, f := range files {
				_ = f.Close()
			}
			mu.Unlock()
			db, err = nil, damagedErr(path, fmt.Sprintf("bbolt failed opening it: %v", p))
		}
	}()
	return bolt.Open(path, 0o600, &opts)
}

// treeDamage reads the tree of db, just opened, from the file (see
// bolt_pages.go). A tree that would take bbolt outside the file, down a
// cycle, or through more than maxInlineNesting inline buckets one inside
// another, is returned as err: the file is refused, since no guard
// survives the first two, and the walk's stack not the third. Any other
// damage to the tree is returned as damage: the store then opens for
// reads only, since a write could copy a damaged length into the pages it
// writes. A sound tree costs a read of each of its pages, forward through
// the file, a level of the tree at a time.
func treeDamage(db *bolt.DB, path string) (damage, err error) {
	tx, err := db.Begin(false)
	if err != nil {
		return nil, fmt.Errorf("failed to read %s: %w", path, boltErr(err))
	}
	defer func() { _ = tx.Rollback() }()
	damage = walkBoltPages(path, tx, true)
	if damage == nil {
		return nil, nil
	}
	if !errors.Is(damage, ErrCorrupt) {
		return nil, fmt.Errorf("failed to read %s: %w", path, boltErr(damage))
	}
	if err := walkBoltPages(path, tx, false); err != nil {
		return nil, damagedErr(path, err)
	}
	return damagedErr(path, fmt.Sprintf("its pages are damaged (%v)", damage)), nil
}

// checkPages runs bbolt's own consistency check of pages and freelist.
// bbolt runs it on a goroutine of its own, where it recovers panics but
// where a fault in the memory map would kill the process and a cycle of
// pages would recurse without end; so the tree is first read from the file
// (walkBoltPages, bolt_pages.go), and bbolt's check only runs on a tree
// that lies within the file.
func (b *boltTx) checkPages() (found []string, err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if err := walkBoltPages(b.eng.path, b.tx, true); err != nil {
		return nil, fmt.Errorf("%w (%s)", err, salvageHint(b.eng.path))
	}
	for e := range b.tx.Check() {
		found = append(found, e.Error())
	}
	if len(found) > 0 {
		found = append(found, salvageHint(b.eng.path))
	}
	return found, nil
}

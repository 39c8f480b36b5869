package storage

import (
	"encoding/binary"
	"fmt"
	"runtime/debug"
	"slices"

	bolt "go.etcd.io/bbolt"
)

// The page walk: a bbolt tree read from the file as bbolt reads it.
//
// Some damage kills a process that reads a bbolt file whatever guard runs:
// a cycle of pages, down which bbolt's cursor descends for ever (a stack
// overflow, or a stack of pages growing until memory runs out); a page id,
// length or offset that takes bbolt outside the file, where it reads
// whatever memory lies beyond its map (a cycle again, or a length of
// gigabytes to copy); and a fault in bbolt's own check (Tx.Check), which
// reads the map on a goroutine of its own, where no recover of ours
// reaches. So the tree is read from the file by us, never through bbolt's
// map, bounds checked, following every page id bbolt may follow, in one of
// two modes:
//
//   - sound: what bbolt writes. Every page reachable once, among the pages
//     in use, of the kind it must be; every element, key and value within
//     its page; every bucket header within its value. bbolt's check then
//     reads nothing outside the file, and a write copies no damaged
//     length. What it reads of a page lies within the page's span (the
//     page and its overflow pages), so the walk goes breadth first, each
//     level in file order, through a window read from the file
//     (fileWindow): a first touch of each page of a mapping costs about
//     6-8x as much as reading it in large pieces.
//   - contained: every byte bbolt may read lies within the file, and every
//     descent ends, through at most maxInlineNesting inline buckets one
//     inside another. Other damage is left to the guard of each call
//     (bolt_damage.go), which turns a panic into ErrDamaged when a call
//     meets it. A damaged page may point anywhere in the file, so this
//     walk reads a mapping of the file of our own (mapFile), depth first;
//     it runs only on a file the sound walk found damaged.

// bbolt's page and element layout (go.etcd.io/bbolt/internal/common): a
// page header (id u64, flags u16, count u16, overflow u32), then count
// elements of 16 bytes: a branch element is pos u32, ksize u32, child
// pgid u64; a leaf element is flags u32, pos u32, ksize u32, vsize u32.
// pos counts from the element's own first byte. A bucket's value starts
// with its root pgid and sequence; root 0 means an inline bucket whose
// leaf page follows in the value.
const (
	boltElementSize      = 16
	boltBucketHeaderSize = 16
	boltBranchFlag       = 0x01
	boltLeafFlag         = 0x02
	boltBucketLeafFlag   = 0x01
	boltLastElement      = 0xFFFF // what bbolt's cursor reads as the last element of an empty page
)

// pageWalk reads one transaction's tree from the file's bytes.
type pageWalk struct {
	src      pageSource // the file
	pageSize uint64
	pages    uint64 // pages the tree may name: in use (sound) or in the file
	sound    bool
	state    []walkState // by page id, for those pages
	next     []uint64    // sound: the pages of the next level down
	nested   int         // inline buckets the walk is inside
}

// maxInlineNesting bounds how deep a contained walk follows inline
// buckets inside inline buckets, which bbolt never writes (an inline
// bucket holds no bucket): each level is a few bytes of a value, so a
// damaged file could otherwise nest millions deep and overflow the stack.
const maxInlineNesting = 64

type walkState uint8

const (
	descending walkState = iota + 1 // on the path from the root (contained walks)
	walked                          // walked, with everything below
	overflow                        // an overflow page of a walked page
)

// span is a page, or an inline bucket's page inside a value: where it
// starts and ends in the file. page is the file page it is or lies in;
// elem, for an inline page, the element of page whose value holds it,
// else -1.
type span struct {
	base, end uint64
	page      uint64
	elem      int
}

func (s span) inline() bool { return s.elem >= 0 }

// where names s in an error.
func (s span) where() string {
	if s.inline() {
		return fmt.Sprintf("the inline bucket of element %d of page %d", s.elem, s.page)
	}
	return fmt.Sprintf("page %d", s.page)
}

// walkBoltPages reads the tree of the read transaction tx from the file at
// path. sound asks for a tree as bbolt writes it; otherwise one that keeps
// bbolt within the file. The error names the first damage met (ErrCorrupt;
// a sound walk meets it level by level), a read of the pages that failed
// (ErrDamaged), or a file that could not be opened or mapped.
func walkBoltPages(path string, tx *bolt.Tx, sound bool) (err error) {
	var src pageSource
	if sound {
		fw, err := openFileWindow(path, uint64(tx.DB().Info().PageSize))
		if err != nil {
			return fmt.Errorf("reading %s: %w", path, boltErr(err))
		}
		src = fw
	} else {
		data, unmap, err := mapFile(path)
		if err != nil {
			return fmt.Errorf("reading %s: %w", path, boltErr(err))
		}
		src = mappedFile(data)
		defer unmap()
	}
	defer src.close()
	// A read error of the disk under a mapping is a fault: it becomes a
	// panic, and damage (a read error of the window is damage too).
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("reading %s: %v: %w", path, p, ErrDamaged)
		}
	}()
	w := pageWalk{src: src, pageSize: uint64(tx.DB().Info().PageSize), sound: sound}
	w.pages = min(uint64(tx.Size()), src.size()) / w.pageSize
	if !sound {
		w.pages = src.size() / w.pageSize // bbolt reads any page of the file
	}
	w.state = make([]walkState, w.pages)
	if err := w.tree(uint64(tx.Cursor().Bucket().Root())); err != nil {
		return err
	}
	return w.levels()
}

// levels walks the pages that tree queued (sound walks only), a level at
// a time, each level in the order of the file, so that the window reads
// the file forward.
func (w *pageWalk) levels() error {
	var level []uint64
	for len(w.next) > 0 {
		level, w.next = w.next, level[:0]
		slices.Sort(level)
		for i, id := range level {
			w.src.plan(level[i+1:])
			s, err := w.page(id)
			if err != nil {
				return err
			}
			if err := w.node(s); err != nil {
				return err
			}
		}
	}
	return nil
}

// tree walks file page id and everything below it: at once when the tree
// must be contained, else (sound) in its level, by levels.
func (w *pageWalk) tree(id uint64) error {
	if id < 2 || id >= w.pages {
		return pageDamage("a tree names page %d, outside the %d pages it may name", id, w.pages)
	}
	switch w.state[id] {
	case descending:
		return pageDamage("page %d lies below itself: bbolt would descend into it for ever", id)
	case walked, overflow:
		if w.sound {
			return pageDamage("page %d is reached twice in the tree", id)
		}
		return nil
	}
	if w.sound {
		// Reached once (a cycle included) is all the order can change:
		// every check of a sound page lies within its span.
		w.state[id] = walked
		w.next = append(w.next, id)
		return nil
	}
	s, err := w.page(id)
	if err != nil {
		return err
	}
	w.state[id] = descending
	err = w.node(s)
	w.state[id] = walked
	return err
}

// page is page id: one page, and its overflow pages when the tree must be
// sound (bbolt reads a contained tree through its map, whatever a page
// claims as overflow).
func (w *pageWalk) page(id uint64) (span, error) {
	s := span{base: id * w.pageSize, end: (id + 1) * w.pageSize, page: id, elem: -1}
	if !w.sound {
		return s, nil
	}
	head, err := w.src.read(s.base, boltPageHeaderSize)
	if err != nil {
		return span{}, err
	}
	if got := binary.LittleEndian.Uint64(head); got != id {
		return span{}, pageDamage("page %d says it is page %d", id, got)
	}
	more := uint64(binary.LittleEndian.Uint32(head[12:]))
	if more >= w.pages-id {
		return span{}, pageDamage("page %d claims %d overflow pages, past the %d pages in use", id, more, w.pages)
	}
	for i := id + 1; i <= id+more; i++ {
		if w.state[i] != 0 {
			return span{}, pageDamage("page %d, an overflow page of page %d, is reached twice in the tree", i, id)
		}
		w.state[i] = overflow
	}
	s.end += more * w.pageSize
	// The whole span at once: what node reads of it stays valid while it
	// reads the rest.
	if _, err := w.src.read(s.base, s.end-s.base); err != nil {
		return span{}, err
	}
	return s, nil
}

// bytes returns the n bytes of the file at off, which must end by end.
func (w *pageWalk) bytes(s span, off, n, end uint64) ([]byte, error) {
	end = min(end, w.src.size())
	if off > end || n > end-off {
		return nil, pageDamage("%s has %d bytes at byte %d of the file, past %d: a length or offset is damaged", s.where(), n, off, end)
	}
	return w.src.read(off, n)
}

// node walks the page s: the children of a branch page, the buckets of a
// leaf page. bbolt reads a page as a leaf only when its flags say leaf
// and nothing else; its cursor descends into any other page as a branch,
// through element 0 even when it counts none, and through element 0xFFFF
// when it looks for the last of none.
func (w *pageWalk) node(s span) error {
	head, err := w.bytes(s, s.base, boltPageHeaderSize, w.limit(s))
	if err != nil {
		return err
	}
	le := binary.LittleEndian
	flags, count := le.Uint16(head[8:]), uint64(le.Uint16(head[10:]))
	leaf := flags == boltLeafFlag
	switch {
	case s.inline() && !leaf:
		// bbolt writes inline pages as leaves only; read as a branch, its
		// page ids name the page itself (0) or nothing.
		return pageDamage("%s is not a leaf (flags %#x): bbolt could descend into it for ever", s.where(), flags)
	case w.sound && !leaf && (flags != boltBranchFlag || count == 0):
		return pageDamage("%s is no page bbolt writes (flags %#x, %d elements)", s.where(), flags, count)
	}
	first := s.base + boltPageHeaderSize
	if count == 0 && !leaf { // an empty branch page
		for _, i := range []uint64{0, boltLastElement} {
			e, err := w.bytes(s, first+i*boltElementSize, boltElementSize, w.limit(s))
			if err != nil {
				return err
			}
			if err := w.element(s, e, i, leaf); err != nil {
				return err
			}
		}
		return nil
	}
	table, err := w.bytes(s, first, count*boltElementSize, w.limit(s))
	if err != nil {
		return err
	}
	for i := range count {
		if err := w.element(s, table[i*boltElementSize:(i+1)*boltElementSize], i, leaf); err != nil {
			return err
		}
	}
	return nil
}

// element walks element i of s, whose 16 bytes are e: a branch element's
// child, a leaf element's bucket.
func (w *pageWalk) element(s span, e []byte, i uint64, leaf bool) error {
	le := binary.LittleEndian
	at := s.base + boltPageHeaderSize + i*boltElementSize
	if !leaf {
		if err := w.extent(s, at+uint64(le.Uint32(e[0:])), uint64(le.Uint32(e[4:]))); err != nil {
			return err
		}
		return w.tree(le.Uint64(e[8:]))
	}
	keyAt := at + uint64(le.Uint32(e[4:]))
	ksize, vsize := uint64(le.Uint32(e[8:])), uint64(le.Uint32(e[12:]))
	if err := w.extent(s, keyAt, ksize+vsize); err != nil {
		return err
	}
	if le.Uint32(e[0:])&boltBucketLeafFlag == 0 {
		return nil
	}
	return w.bucket(s, int(i), keyAt+ksize, vsize)
}

// limit is where what s holds must end: its own end when the tree must be
// sound or s is an inline page (bbolt reads an unaligned value's inline
// page from a copy of the value), else the file's.
func (w *pageWalk) limit(s span) uint64 {
	if w.sound || s.inline() {
		return s.end
	}
	return w.src.size()
}

// bucket walks the bucket whose value of vsize bytes lies at off, element
// i of s: its root page, or its inline page, which must lie within the
// value.
func (w *pageWalk) bucket(s span, i int, off, vsize uint64) error {
	if vsize < boltBucketHeaderSize {
		return pageDamage("element %d of %s is a bucket whose value of %d bytes holds no bucket header", i, s.where(), vsize)
	}
	header, err := w.bytes(s, off, boltBucketHeaderSize, w.limit(s))
	if err != nil {
		return err
	}
	if s.inline() && (w.sound || w.nested >= maxInlineNesting) {
		return pageDamage("element %d of %s is a bucket inside an inline bucket, which bbolt never writes (%d deep)", i, s.where(), w.nested)
	}
	if root := binary.LittleEndian.Uint64(header); root != 0 {
		return w.tree(root)
	}
	w.nested++
	defer func() { w.nested-- }()
	return w.node(span{base: off + boltBucketHeaderSize, end: off + vsize, page: s.page, elem: i})
}

// extent checks that the n bytes at off, a key or a key and its value,
// end by s's limit (and, when the tree must be sound, start within s).
func (w *pageWalk) extent(s span, off, n uint64) error {
	if w.sound && off < s.base {
		return pageDamage("%s has a key before its start: an offset is damaged", s.where())
	}
	_, err := w.bytes(s, off, n, w.limit(s))
	return err
}

// pageDamage is an ErrCorrupt error about the file's pages.
func pageDamage(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, ErrCorrupt)...)
}

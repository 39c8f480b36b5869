package main

import (
	binenc "encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
)

// Reading a damaged bbolt file page by page.
//
// bbolt's cursor stops at the first page it cannot read, and a damaged
// branch page or meta page hides every leaf below it. The leaves hold the
// records themselves, so salvage also reads the file's bytes directly:
// every page by its id, every element of every leaf page on its own, each
// offset checked against the bytes at hand. A snapshot bucket is found by
// its contents (plain "id" and "kind" keys) and named by the key of the
// element whose value is its bucket header.
//
// The layout is bbolt's (go.etcd.io/bbolt/internal/common), little-endian:
// a page starts with a 16-byte header (id uint64, flags uint16, count
// uint16, overflow uint32); a leaf page's elements follow it, 16 bytes
// each (flags, pos, ksize, vsize, all uint32), with the key and the value
// at the element's own offset + pos. A sub-bucket's value is a bucket
// header (root pgid, sequence), followed, when root is 0, by an inline
// page holding its elements.
//
// bbolt pages carry no txid, so which of two copies of a record is newer
// cannot be read from the pages. What can be told: with both meta pages
// valid, the freelist of the newer one names the pages no committed tree
// uses (stale copies, or pages of a commit that never finished), and pages
// at or above its high-water mark are no committed tree's either.
// Otherwise every page is read, and copies that disagree are ambiguous.

const (
	pageHeaderSize = 16
	leafElemSize   = 16
	bucketHdrSize  = 16
	branchFlag     = 0x01
	leafFlag       = 0x02
	metaFlag       = 0x04
	freelistFlag   = 0x10
	bucketLeafFlag = 0x01

	boltMagic   = 0xED0CDAED
	boltVersion = 2
	// A snapshot bucket is nested at most this deep below a real page:
	// root bucket, v1, snapshots, each inline in a small store.
	maxInlineDepth = 4
)

var le = binenc.LittleEndian

type metaPage struct {
	pageSize           uint64
	root, freelist, hw uint64
	txid               uint64
}

// parseMeta decodes the meta page at the start of p (bbolt's
// Meta.Validate): magic, version and checksum must hold.
func parseMeta(p []byte) (metaPage, bool) {
	if len(p) < pageHeaderSize+64 {
		return metaPage{}, false
	}
	m := p[pageHeaderSize : pageHeaderSize+64]
	if le.Uint32(m[0:]) != boltMagic || le.Uint32(m[4:]) != boltVersion {
		return metaPage{}, false
	}
	h := fnv.New64a()
	_, _ = h.Write(m[:56])
	if h.Sum64() != le.Uint64(m[56:]) {
		return metaPage{}, false
	}
	return metaPage{
		pageSize: uint64(le.Uint32(m[8:])),
		root:     le.Uint64(m[16:]),
		freelist: le.Uint64(m[32:]),
		hw:       le.Uint64(m[40:]),
		txid:     le.Uint64(m[48:]),
	}, true
}

// elem is one leaf element.
type elem struct {
	key, value []byte
	bucket     bool
}

// leafElems parses the count elements that start at b[0], each on its
// own: an element whose offsets leave b is skipped and counted as bad.
func leafElems(b []byte, count int) (elems []elem, bad int) {
	for i := 0; i < count; i++ {
		at := uint64(i) * leafElemSize
		if at+leafElemSize > uint64(len(b)) {
			return elems, bad + count - i
		}
		e := b[at:]
		flags, pos := le.Uint32(e[0:]), uint64(le.Uint32(e[4:]))
		ksize, vsize := uint64(le.Uint32(e[8:])), uint64(le.Uint32(e[12:]))
		k := at + pos
		if pos == 0 || k+ksize+vsize > uint64(len(b)) || ksize == 0 {
			bad++
			continue
		}
		elems = append(elems, elem{
			key:    b[k : k+ksize : k+ksize],
			value:  b[k+ksize : k+ksize+vsize : k+ksize+vsize],
			bucket: flags&bucketLeafFlag != 0,
		})
	}
	return elems, bad
}

// pageNote is a leaf page with entries that could not be read.
type pageNote struct {
	page       uint64
	bad, count int
	snapshots  bool // its other entries are snapshots
}

func (n pageNote) String() string {
	if n.snapshots {
		return fmt.Sprintf("page %d: %d of its %d snapshot entries unreadable (names unknown)", n.page, n.bad, n.count)
	}
	return fmt.Sprintf("page %d: a leaf page with %d of its %d entries unreadable; what they held is unknown", n.page, n.bad, n.count)
}

// snapCopy is one copy of a snapshot record found in the pages.
type snapCopy struct {
	page uint64 // the real page holding it (or its parent element)
	rec  storage.Record
	id   uint64
	err  error
}

// pageScan is what a page-by-page read of a file found.
type pageScan struct {
	pageSize  int
	metas     int             // valid meta pages
	free      map[uint64]bool // pages no committed tree uses; nil: unknown
	hw        uint64          // pages at or above it are skipped; 0: none
	copies    map[string][]snapCopy
	children  map[uint64]string // the parents index: child ID -> name
	seq       uint64            // highest snapshots bucket sequence seen
	notes     []pageNote        // pages whose entries could not all be read
	data      []byte
	pagesRead int
	depth     int               // of leafPage calls: only the outer one resyncs
	own       map[uint64][]elem // pages that are a snapshot bucket's own
	named     map[uint64]bool   // of those, the ones an element names
	nameless  []snapCopy        // records whose name was not found
	suspect   map[string]bool   // keys out of order: damaged in place
}

// scanPages reads every page of data (a bbolt file's bytes, never
// written) and collects every snapshot record it can decode.
func scanPages(data []byte) *pageScan {
	s := &pageScan{data: data, copies: map[string][]snapCopy{}, children: map[uint64]string{},
		own: map[uint64][]elem{}, named: map[uint64]bool{}, suspect: map[string]bool{}}
	// The page size from a valid meta page; the newest valid one names
	// the freelist.
	var metas []metaPage
	if m, ok := parseMeta(data); ok {
		metas = append(metas, m)
	}
	for ps := 1024; ps <= 1<<24 && ps < len(data); ps <<= 1 {
		if m, ok := parseMeta(data[ps:]); ok && m.pageSize == uint64(ps) {
			metas = append(metas, m)
			break
		}
	}
	s.pageSize = 4096
	if len(metas) > 0 && metas[0].pageSize >= 1024 && metas[0].pageSize <= 1<<24 {
		s.pageSize = int(metas[0].pageSize)
	}
	s.metas = len(metas)
	if len(metas) == 2 && metas[0].pageSize == metas[1].pageSize {
		// Only with both meta pages valid is the newer one known to be
		// the last commit; a lone valid meta page may be the older one,
		// and its freelist may list pages the lost newer commit reused.
		m := metas[0]
		if metas[1].txid > m.txid {
			m = metas[1]
		}
		if free, ok := s.readFreelist(m.freelist); ok {
			s.free, s.hw = free, m.hw
		}
	}
	pages := (uint64(len(data)) + uint64(s.pageSize) - pageHeaderSize - 1) / uint64(s.pageSize)
	for pg := uint64(2); pg < pages; pg++ {
		if s.free != nil && (s.free[pg] || pg >= s.hw) {
			continue
		}
		elems, count, ok := s.leafPage(pg)
		if !ok {
			continue
		}
		s.pagesRead++
		found, bad := s.level(pg, elems, 0)
		bad += count - len(elems)
		if bad > 0 && (found > 0 || len(elems) < count) {
			s.notes = append(s.notes, pageNote{page: pg, bad: bad, count: count, snapshots: found > 0})
		}
	}
	// A snapshot bucket too large to be inline (one with labels always
	// is) has a page of its own, and its name is in the element pointing
	// to it; if that was not found, the parents index may name it by ID.
	for pg, elems := range s.own {
		if s.named[pg] {
			continue
		}
		before := len(s.copies[""])
		s.add("", pg, elems)
		c := s.copies[""][before]
		delete(s.copies, "")
		if name, ok := s.children[c.id]; ok && c.err == nil {
			c.rec.Name = name
			s.copies[name] = append(s.copies[name], c)
			continue
		}
		s.nameless = append(s.nameless, c)
	}
	return s
}

// page returns page pg with its overflow pages, cut at the end of the
// file, or nil if it is not there or its header names another page.
func (s *pageScan) page(pg uint64) []byte {
	ps := uint64(s.pageSize)
	if pg > uint64(len(s.data))/ps {
		return nil
	}
	start := pg * ps
	if start+pageHeaderSize > uint64(len(s.data)) || le.Uint64(s.data[start:]) != pg {
		return nil
	}
	overflow := uint64(le.Uint32(s.data[start+12:]))
	end := min(uint64(len(s.data)), start+(overflow+1)*ps)
	if overflow > uint64(len(s.data))/ps { // damaged: the rest of the file at most
		end = uint64(len(s.data))
	}
	return s.data[start:end]
}

// leafPage parses page pg as a leaf page, with the elements whose
// headers are damaged read again from their data (see resync).
func (s *pageScan) leafPage(pg uint64) ([]elem, int, bool) {
	p := s.page(pg)
	if p == nil || le.Uint16(p[8:]) != leafFlag {
		return nil, 0, false
	}
	count := int(le.Uint16(p[10:]))
	if s.depth > 0 {
		// Only the pages the scan walks are read again: a page a bucket
		// header points to, while a run is being read, is parsed as it
		// is, which keeps the work per page bounded (and a loop of pages
		// in a damaged file finite).
		elems, _ := leafElems(p[pageHeaderSize:], count)
		return elems, count, true
	}
	s.depth++
	defer func() { s.depth-- }()
	return s.resync(p[pageHeaderSize:], count), count, true
}

// resync parses the count elements at b[0] and reads again those whose
// header is damaged. bbolt writes a page's keys and values contiguously, in
// element order, right after the element headers, so the data of a run of
// damaged headers lies between the end of the good element before it (or
// the end of the headers) and the key of the good element after it. Read
// from there as key, bucket header (of an inline bucket: 16 zero bytes,
// then a leaf page; of another: its root page, a snapshot bucket's, and a
// zero sequence), key, bucket header..., a run is kept only if it yields exactly
// as many snapshot buckets, ends exactly at the next good key, and its
// keys sort between its neighbours': otherwise its elements stay lost.
func (s *pageScan) resync(b []byte, count int) []elem {
	type slot struct {
		e        elem
		ok       bool
		from, to uint64 // where its key starts and its value ends, in b
	}
	slots := make([]slot, count)
	for i := range slots {
		at := uint64(i) * leafElemSize
		if at+leafElemSize > uint64(len(b)) {
			break
		}
		one, bad := leafElems(b[at:], 1)
		if bad > 0 {
			continue
		}
		from := at + uint64(le.Uint32(b[at+4:]))
		slots[i] = slot{e: one[0], ok: true, from: from, to: from + uint64(len(one[0].key)+len(one[0].value))}
	}
	// A damaged header may still point inside the page: a good element's
	// data starts where the one before ends, or ends where the one after
	// starts. One that joins neither is taken as damaged (the last one,
	// after a damaged one, cannot be checked).
	joined := make([]bool, count)
	for i := range slots {
		prevEnd := uint64(count) * leafElemSize
		if i > 0 {
			prevEnd = slots[i-1].to
		}
		joined[i] = slots[i].ok && ((i == 0 || slots[i-1].ok) && slots[i].from == prevEnd ||
			i+1 < count && slots[i+1].ok && slots[i].to == slots[i+1].from ||
			i == count-1)
	}
	for i := range slots {
		slots[i].ok = joined[i]
	}
	var elems []elem
	for i := 0; i < count; {
		if slots[i].ok {
			elems = append(elems, slots[i].e)
			i++
			continue
		}
		j := i // the run is i..j-1
		for j < count && !slots[j].ok {
			j++
		}
		from, to := uint64(count)*leafElemSize, uint64(len(b))
		var lo, hi []byte
		if i > 0 {
			from, lo = slots[i-1].to, slots[i-1].e.key
		}
		if j < count {
			to, hi = slots[j].from, slots[j].e.key
		}
		if run, ok := s.readRun(b, from, to, j-i, j < count, lo, hi); ok {
			elems = append(elems, run...)
		}
		i = j
	}
	return elems
}

// readRun reads n elements (key, snapshot bucket) from b[from:to]; exact
// says the last must end at to.
//
// Where a key ends is written nowhere but in the damaged headers: it is
// where a snapshot bucket value starts. The first such place is not always
// the right one: a key followed by the header of a bucket with a page of
// its own (root pgid, zero sequence) also reads as the key without its
// last byte followed by a bucket header whose root is that byte plus 256
// times the true root (the root's zero high bytes and the sequence read as
// a zero sequence). With a small true root (bbolt allocates a bucket's
// pages in map order, so any snapshot may have one), that root is often
// another snapshot bucket's page, so "s-02903" with root 9 also reads as
// "s-0290" with root 2355. So every way of cutting the run is tried; it is
// kept only if exactly one satisfies every condition (as many snapshot
// buckets, keys in order, the exact end): two would name records at
// random, so then its elements stay lost, as they do when the tries run
// out.
func (s *pageScan) readRun(b []byte, from, to uint64, n int, exact bool, lo, hi []byte) ([]elem, bool) {
	if from > to || to > uint64(len(b)) {
		return nil, false
	}
	d := b[from:to]
	// snapshotValueAt(d[i:]) + 1, 0 while not yet read.
	sizes := make([]uint64, len(d)+1)
	valueAt := func(i int) uint64 {
		if sizes[i] == 0 {
			sizes[i] = s.snapshotValueAt(d[i:]) + 1
		}
		return sizes[i] - 1
	}
	budget := 1 << 20 // offsets tried, over the whole run
	var found []elem
	parses := 0
	run := make([]elem, 0, n)
	// walk cuts d[at:] into the elements still missing after lo; false
	// stops the search (a second parse, or the tries ran out).
	var walk func(at int, lo []byte) bool
	walk = func(at int, lo []byte) bool {
		if len(run) == n {
			if !exact || at == len(d) {
				if parses++; parses > 1 {
					return false
				}
				found = append([]elem(nil), run...)
			}
			return true
		}
		// The elements after this one take 1 + 16 bytes each at least.
		last := len(d) - at - bucketHdrSize - (n-len(run)-1)*(1+bucketHdrSize)
		for k := 1; k <= last && k <= 4096; k++ {
			if budget--; budget < 0 {
				return false
			}
			size := valueAt(at + k)
			if size == 0 {
				continue
			}
			key := d[at : at+k : at+k]
			if (lo != nil && string(key) <= string(lo)) || (hi != nil && string(key) >= string(hi)) {
				continue
			}
			end := at + k + int(size)
			run = append(run, elem{key: key, value: d[at+k : end : end], bucket: true})
			more := walk(end, key)
			run = run[:len(run)-1]
			if !more {
				return false
			}
		}
		return true
	}
	if !walk(0, lo) || parses != 1 {
		return nil, false
	}
	return found, true
}

// snapshotValueAt returns the length of the snapshot bucket value that v
// starts with, or 0 if it does not start with one.
func (s *pageScan) snapshotValueAt(v []byte) uint64 {
	if len(v) < bucketHdrSize || le.Uint64(v[8:]) != 0 { // snapshot buckets keep no sequence
		return 0
	}
	if root := le.Uint64(v); root != 0 {
		if sub, _, ok := s.bucketElems(v[:bucketHdrSize]); ok && isSnapshot(sub) {
			return bucketHdrSize
		}
		return 0
	}
	page := v[bucketHdrSize:]
	if len(page) < pageHeaderSize || le.Uint64(page) != 0 || le.Uint16(page[8:]) != leafFlag || le.Uint32(page[12:]) != 0 {
		return 0
	}
	cnt := int(le.Uint16(page[10:]))
	sub, bad := leafElems(page[pageHeaderSize:], cnt)
	if bad > 0 || !isSnapshot(sub) {
		return 0
	}
	size := uint64(bucketHdrSize + pageHeaderSize + leafElemSize*cnt)
	for _, e := range sub {
		size += uint64(len(e.key) + len(e.value))
	}
	if size > uint64(len(v)) {
		return 0
	}
	return size
}

// readFreelist reads the ids of the freelist page pg.
func (s *pageScan) readFreelist(pg uint64) (map[uint64]bool, bool) {
	p := s.page(pg)
	if p == nil || le.Uint16(p[8:]) != freelistFlag {
		return nil, false
	}
	ids := p[pageHeaderSize:]
	count := uint64(le.Uint16(p[10:]))
	if count == 0xFFFF { // the true count is the first id slot
		if len(ids) < 8 {
			return nil, false
		}
		count, ids = le.Uint64(ids), ids[8:]
	}
	if count > uint64(len(ids))/8 {
		return nil, false
	}
	free := make(map[uint64]bool, count)
	for i := uint64(0); i < count; i++ {
		free[le.Uint64(ids[8*i:])] = true
	}
	return free, true
}

// bucketElems returns the elements of the sub-bucket whose header is v:
// those of its inline page, or of its root page if that is a leaf.
func (s *pageScan) bucketElems(v []byte) (elems []elem, inline, ok bool) {
	if len(v) < bucketHdrSize {
		return nil, false, false
	}
	root := le.Uint64(v)
	if root != 0 {
		if s.free != nil && (s.free[root] || root >= s.hw) {
			return nil, false, false
		}
		elems, _, ok := s.leafPage(root)
		return elems, false, ok
	}
	p := v[bucketHdrSize:]
	if len(p) < pageHeaderSize || le.Uint16(p[8:])&leafFlag == 0 {
		return nil, true, false
	}
	elems, bad := leafElems(p[pageHeaderSize:], int(le.Uint16(p[10:])))
	return elems, true, bad == 0
}

// isSnapshot says that elems are a snapshot bucket's contents.
func isSnapshot(elems []elem) bool {
	var id, kind bool
	for _, e := range elems {
		switch string(e.key) {
		case storage.KeyID:
			id = !e.bucket
		case storage.KeyKind:
			kind = !e.bucket
		}
	}
	return id && kind
}

// level looks for snapshot buckets among elems, the contents of real page
// pg or of a bucket inline in it, and returns how many it found and how
// many of its entries are not what the level holds. A level that is a
// snapshot bucket itself (a large one, in a page of its own) holds none:
// its labels are not snapshots.
func (s *pageScan) level(pg uint64, elems []elem, depth int) (found, bad int) {
	if isSnapshot(elems) {
		if depth == 0 {
			s.own[pg] = elems // named by the element that points here, if found
		}
		return 0, 0
	}
	s.indexEntries(elems)
	suspect := outOfOrder(elems)
	var other int
	var failed []elem
	for i, e := range elems {
		if suspect[i] {
			s.suspect[string(e.key)] = true
		}
		if !e.bucket || len(e.value) < bucketHdrSize || suspect[i] {
			other++
			continue
		}
		if string(e.key) == storage.KeySnapshots {
			s.seq = max(s.seq, le.Uint64(e.value[8:]))
		}
		sub, inline, ok := s.bucketElems(e.value)
		switch {
		case ok && isSnapshot(sub):
			found++
			s.add(string(e.key), pg, sub)
			if !inline {
				s.named[le.Uint64(e.value)] = true
			}
		case ok && inline && depth < maxInlineDepth:
			f, b := s.level(pg, sub, depth+1)
			found += f
			bad += b
			if f == 0 {
				failed = append(failed, e)
			}
		case !ok:
			failed = append(failed, e)
		}
	}
	if found > 0 {
		// A level of snapshots holds nothing else: its other entries
		// are damaged. Those whose key still reads are lost by name.
		bad += other
		for _, e := range failed {
			name := string(e.key)
			s.copies[name] = append(s.copies[name], snapCopy{page: pg, err: fmt.Errorf("its bucket in page %d is unreadable", pg)})
		}
	}
	return found, bad
}

// outOfOrder marks the keys that break the order bbolt keeps them in: a
// key damaged in place. bbolt's pages carry no checksum, so this is the
// only sign of it; a damaged key that still sorts between its neighbours
// cannot be told from a good one. Of two keys out of order with each
// other, both are marked unless one of them is in order with the key
// beyond.
func outOfOrder(elems []elem) []bool {
	n := len(elems)
	lt := func(a, b int) bool {
		return a < 0 || b >= n || string(elems[a].key) < string(elems[b].key)
	}
	suspect := make([]bool, n)
	for i := range elems {
		suspect[i] = !lt(i-1, i) || !lt(i, i+1)
	}
	// A key whose neighbours are in order with each other and with it
	// is good, even if marked for a bad neighbour.
	for i := range elems {
		if suspect[i] && lt(i-1, i) && lt(i, i+1) {
			suspect[i] = false
		}
	}
	for i := range elems {
		if !suspect[i] {
			continue
		}
		// A key out of order only with a neighbour that is itself out
		// of order with its other side: the neighbour is the damaged one.
		if !lt(i-1, i) && lt(i, i+1) && !lt(i-2, i-1) && lt(i-2, i) {
			suspect[i] = false
		}
		if !lt(i, i+1) && lt(i-1, i) && !lt(i+1, i+2) && lt(i, i+2) {
			suspect[i] = false
		}
	}
	return suspect
}

// indexEntries records the entries of the parents index among elems
// (uvarint parent ID, 0, uvarint child ID -> child name): they name
// snapshots whose record may be lost.
func (s *pageScan) indexEntries(elems []elem) {
	for _, e := range elems {
		if e.bucket || len(e.value) == 0 {
			continue
		}
		_, n := binenc.Uvarint(e.key)
		if n <= 0 || n >= len(e.key) || e.key[n] != 0 {
			continue
		}
		cid, m := binenc.Uvarint(e.key[n+1:])
		if m <= 0 || n+1+m != len(e.key) || cid == 0 {
			continue
		}
		s.children[cid] = string(e.value)
	}
}

// add decodes the snapshot bucket named name.
func (s *pageScan) add(name string, pg uint64, elems []elem) {
	f := snapFields{vals: map[string][]byte{}, buckets: map[string]bool{}}
	for _, e := range elems {
		if e.bucket {
			f.buckets[string(e.key)] = true
			if string(e.key) == storage.KeyLabels {
				sub, _, ok := s.bucketElems(e.value)
				if !ok {
					f.labelsErr = errors.New("labels bucket unreadable")
				}
				for _, l := range sub {
					if f.labels == nil {
						f.labels = map[string]string{}
					}
					f.labels[string(l.key)] = string(l.value)
				}
			}
			continue
		}
		f.vals[string(e.key)] = e.value
	}
	rec, id, err := f.record(name)
	s.copies[name] = append(s.copies[name], snapCopy{page: pg, rec: rec, id: id, err: err})
}

// snapFields is a snapshot bucket's contents, however read.
type snapFields struct {
	vals      map[string][]byte // plain values
	buckets   map[string]bool   // keys holding a sub-bucket
	labels    map[string]string // the labels bucket's contents
	labelsErr error
}

// record decodes f with the rules of the library's decodeBolt (bolt.go),
// which is not exported and reads a *bolt.Bucket: this is a copy of those
// rules over bytes. The ID must be a uvarint above 0, the kind one byte,
// the parent and the chain plain values, the times and usage well formed,
// and labels a bucket.
func (f snapFields) record(name string) (storage.Record, uint64, error) {
	rec := storage.Record{Name: name}
	bad := func(key string, err error) (storage.Record, uint64, error) {
		return rec, 0, fmt.Errorf("bad %q: %v", key, err)
	}
	id, n := binenc.Uvarint(f.vals[storage.KeyID])
	if n <= 0 || id == 0 {
		return bad(storage.KeyID, errors.New("no ID"))
	}
	rec.ID = strconv.FormatUint(id, 10)
	kind := f.vals[storage.KeyKind]
	if len(kind) != 1 {
		return bad(storage.KeyKind, errors.New("not one byte"))
	}
	rec.Kind = snapshots.Kind(kind[0])
	for _, key := range []string{storage.KeyID, storage.KeyKind, storage.KeyParent, storage.KeyParentIDs, storage.KeyCreatedAt, storage.KeyUpdatedAt, storage.KeyInodes, storage.KeySize} {
		if f.buckets[key] {
			return bad(key, errors.New("a bucket, not a value"))
		}
	}
	rec.Parent = string(f.vals[storage.KeyParent])
	for key, t := range map[string]*time.Time{storage.KeyCreatedAt: &rec.Created, storage.KeyUpdatedAt: &rec.Updated} {
		if v, ok := f.vals[key]; ok {
			if err := t.UnmarshalBinary(v); err != nil {
				return bad(key, err)
			}
			*t = t.UTC()
		}
	}
	for key, x := range map[string]*int64{storage.KeyInodes: &rec.Usage.Inodes, storage.KeySize: &rec.Usage.Size} {
		if v, ok := f.vals[key]; ok {
			var n int
			if *x, n = binenc.Varint(v); n <= 0 {
				return bad(key, errors.New("bad varint"))
			}
		}
	}
	for v := f.vals[storage.KeyParentIDs]; len(v) > 0; {
		_, n := binenc.Uvarint(v)
		if n <= 0 {
			return bad(storage.KeyParentIDs, errors.New("bad uvarint"))
		}
		v = v[n:]
	}
	if _, ok := f.vals[storage.KeyLabels]; ok {
		return bad(storage.KeyLabels, errors.New("a plain key, not a bucket"))
	}
	if f.labelsErr != nil {
		return bad(storage.KeyLabels, f.labelsErr)
	}
	rec.Labels = f.labels
	return rec, id, nil
}

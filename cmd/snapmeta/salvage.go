package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime/debug"
	"sort"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
	"github.com/spf13/cobra"
	bolt "go.etcd.io/bbolt"
)

func (a *app) salvageCommand() *cobra.Command {
	var from, to string
	c := &cobra.Command{
		Use:   "salvage --from DAMAGED.db --to NEW.db",
		Short: "Copy what can still be read of a damaged bbolt file to a new one",
		Long: `Copy every snapshot record that can still be read from a damaged bbolt
file to a new file, with its ID, and report exactly what was lost.

The damaged file is read, never written. Records are read twice: through
bbolt's tree, as far as its cursor reaches, and page by page from the
file's bytes, so that a damaged branch page, meta page or truncation hides
no leaf that is still whole. Entries of a leaf page whose element headers
are damaged are read again from their keys and values, unless those can be
cut into keys and values in more than one way (then they are lost, never
named at random). A record that cannot be read is reported lost: by name
when its key still reads or the parents index names it, by ID when only
its bucket's own page survives (a snapshot with labels has a page of its
own, named from another page), as a count of a damaged page's entries
otherwise.

A name found in several pages: with both meta pages valid and the freelist
readable, only pages in use are read, so no stale copy is. Otherwise the
tree's copy wins when both meta pages are valid; copies that differ with
no way to tell which is newer (bbolt pages carry no transaction id) are
reported lost as ambiguous. Without a readable freelist, a record removed
before the damage may come back if its page was not reused.

A record whose parent was lost (or is not committed, or whose ID another
record already has) cannot keep a consistent chain: it is reported lost,
with the reason. The new file passes 'snapmeta check', and its ID allocator
is raised above the highest ID seen, so no lost ID is handed out again.

A truncated file keeps the records of the pages before the cut; bbolt
writes the pages naming snapshot buckets with pages of their own after
them, so those are lost by ID. A key damaged in place that still sorts
between its neighbours cannot be told from a good one.

Exit code 0: everything copied. 1: something lost or damaged (listed on
stdout) or nothing readable. 2: usage error.`,
		Example: `  snapmeta salvage --from /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/metadata.db --to /root/metadata-salvaged.db`,
		Args:    exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			if from == "" || to == "" {
				return usageErrorf("salvage needs --from and --to (see 'snapmeta salvage --help')")
			}
			if _, err := os.Lstat(to); err == nil {
				return fmt.Errorf("%s exists: salvage writes a new file only", to)
			}
			return a.salvage(c.Context(), from, to)
		},
	}
	c.Flags().StringVar(&from, "from", "", "the damaged bbolt file (read only)")
	c.Flags().StringVar(&to, "to", "", "the new bbolt file to create")
	return c
}

// salvaged is what could be read of a damaged file.
type salvaged struct {
	recs     []storage.Record
	lost     []string // one line each, naming the snapshot
	notes    []string // damaged pages, with the count of entries lost
	unnamed  int      // lost entries of damaged pages not named in lost
	highest  uint64
	anything bool // some page or tree could be read
}

func (a *app) salvage(ctx context.Context, from, to string) error {
	prog := a.startProgress("salvage: reading the damaged file", 0)
	s, err := readDamaged(from)
	prog.finish(err == nil)
	if err != nil {
		return fmt.Errorf("nothing could be read from %s: %w", from, err)
	}
	recs, lost := keepConsistent(s.recs)
	s.lost = append(s.lost, lost...)
	ms, err := storage.NewBoltMetaStore(to)
	if err != nil {
		return err
	}
	var kept int
	prog = a.startProgress("salvage: copying", len(recs))
	err = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		// One record per Import: a refused Import writes nothing and the
		// transaction goes on, so a record Import refuses (a name or
		// labels containerd would refuse, read from a damaged page) is
		// lost alone, with its descendants (their parent is then not
		// found), rather than the whole batch.
		kept = 0
		for _, r := range recs {
			if err := storage.Import(ctx, r); err != nil {
				if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
					return err
				}
				s.lost = append(s.lost, fmt.Sprintf("%q: not imported: %v", r.Name, err))
				prog.add(1)
				continue
			}
			kept++
			prog.add(1)
		}
		return storage.RaiseIDs(ctx, s.highest)
	})
	prog.finish(err == nil)
	if cerr := ms.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(to)
		return err
	}
	for _, l := range s.lost {
		fmt.Fprintf(a.stdout, "lost: %s\n", l)
	}
	for _, n := range s.notes {
		fmt.Fprintf(a.stdout, "damaged: %s\n", n)
	}
	nlost := len(s.lost) + s.unnamed
	fmt.Fprintf(a.stdout, "salvaged %d snapshot(s) to %s, %d lost", kept, to, nlost)
	if s.unnamed > 0 {
		fmt.Fprintf(a.stdout, " (%d of them entries of damaged pages whose names are unknown)", s.unnamed)
	}
	fmt.Fprintln(a.stdout)
	if nlost > 0 || len(s.notes) > 0 {
		if nlost == 0 {
			return &exitError{code: 1, err: fmt.Errorf("%d damaged page(s)", len(s.notes))}
		}
		return &exitError{code: 1, err: fmt.Errorf("%d record(s) lost", nlost)}
	}
	return nil
}

// guard runs fn with panics and memory faults turned into an error: the
// file is damaged, and bbolt trusts it.
func guard(fn func() error) (err error) {
	prev := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(prev)
		if p := recover(); p != nil {
			err = fmt.Errorf("bbolt failed reading it: %v", p)
		}
	}()
	return fn()
}

// treeRead is what bbolt's cursor could read of the snapshots bucket.
type treeRead struct {
	opened   bool
	complete bool // the cursor reached the end of the bucket
	names    []string
	recs     map[string]storage.Record
	errs     map[string]error // names reached whose record did not decode
	seq      uint64
}

// readDamaged reads every snapshot record of the file at path that can be
// read: through bbolt's tree, then page by page (see pagescan.go), and
// merges the two.
func readDamaged(path string) (*salvaged, error) {
	data, err := os.ReadFile(path) // read only: the file is never written
	if err != nil {
		return nil, err
	}
	t, treeErr := readTree(path)
	scan := scanPages(data)
	s := &salvaged{anything: t.opened || len(scan.copies) > 0 || len(scan.nameless) > 0}
	if !s.anything {
		if treeErr == nil {
			treeErr = errors.New("no page holds a snapshot record")
		}
		return nil, treeErr
	}
	s.highest = max(t.seq, scan.seq)
	for _, cs := range scan.copies {
		for _, c := range cs {
			s.highest = max(s.highest, c.id) // raising past a stale ID is harmless
		}
	}
	// The tree bbolt read is the last commit's only if both meta pages
	// are valid; with one, it may be the commit before, and copies in the
	// pages may be newer.
	treeNewest := t.opened && scan.metas == 2
	// Names the cursor passed over in the last commit's tree (all of
	// them if it reached the end).
	covered := func(name string) bool {
		if !treeNewest || len(t.names) == 0 {
			return treeNewest && t.complete
		}
		return t.complete || name <= t.names[len(t.names)-1]
	}
	names := map[string]bool{}
	for n := range t.recs {
		names[n] = true
	}
	for n := range t.errs {
		names[n] = true
	}
	for n := range scan.copies {
		names[n] = true
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	for _, name := range sorted {
		good, pages, firstErr := distinctCopies(scan.copies[name])
		tr, inTree := t.recs[name]
		switch {
		case inTree && treeNewest:
			s.recs = append(s.recs, tr) // the last commit's own copy
		case inTree && len(good) == 0, inTree && len(good) == 1 && reflect.DeepEqual(good[0], tr):
			s.recs = append(s.recs, tr)
		case inTree:
			s.lost = append(s.lost, fmt.Sprintf("%q: ambiguous: the tree of the only valid meta page holds one record, page(s) %v another, and which is newer cannot be told", name, pages))
			continue
		case t.errs[name] != nil && len(scan.copies[name]) == 0 && scan.suspect[name]:
			// The cursor read a key the scan found out of order (damaged
			// in place): not a name; the page's note counts the entry.
			continue
		case t.errs[name] != nil && (scan.free == nil || len(good) != 1):
			// The live copy is unreadable; with stale pages not told
			// apart, a copy elsewhere may be an older one.
			s.lost = append(s.lost, fmt.Sprintf("%q: %v", name, t.errs[name]))
			continue
		case scan.free == nil && covered(name):
			// Not in the last commit's tree, where the cursor went: most
			// likely a page left behind by a removed snapshot, but a
			// damaged branch page may also have led the cursor past it.
			// Neither is copied, nor dropped silently. (With the freelist
			// read, only pages in use are scanned: such a copy is live.)
			s.lost = append(s.lost, fmt.Sprintf("%q: in page(s) %v but not in the tree the cursor read through: removed before the damage, or dropped from the tree by it; not copied", name, pages))
			continue
		case len(good) == 1:
			s.recs = append(s.recs, good[0])
		case len(good) > 1:
			s.lost = append(s.lost, fmt.Sprintf("%q: ambiguous: pages %v hold different records, and which is newer cannot be told", name, pages))
			continue
		default:
			s.lost = append(s.lost, fmt.Sprintf("%q: %v", name, firstErr))
			continue
		}
	}
	// The parents index names children whose record may be gone.
	var indexNamed int
	var ids []uint64
	for id := range scan.children {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		name := scan.children[id]
		if names[name] {
			continue
		}
		s.highest = max(s.highest, id)
		msg := fmt.Sprintf("%q (ID %d): named in the parents index, but no record of it could be read", name, id)
		if scan.free == nil {
			msg += " (the index page may be stale: it may have been removed before the damage)"
		} else if covered(name) {
			msg += " (the tree does not have it either)"
		}
		s.lost = append(s.lost, msg)
		indexNamed++
	}
	sort.Slice(scan.nameless, func(i, j int) bool { return scan.nameless[i].page < scan.nameless[j].page })
	for _, c := range scan.nameless {
		s.highest = max(s.highest, c.id)
		msg := fmt.Sprintf("page %d: a snapshot record (ID %d) whose name was not found", c.page, c.id)
		if c.err != nil {
			msg = fmt.Sprintf("page %d: a snapshot record whose name was not found (%v)", c.page, c.err)
		}
		if scan.free == nil {
			msg += " (the page may be a removed snapshot's, left behind)"
		}
		s.lost = append(s.lost, msg)
	}
	// Damaged entries whose names are unknown, beyond those lost by ID
	// above (an index-named or nameless record's entry is one of them, or
	// was on a page that could not be read at all).
	var bad int
	for _, n := range scan.notes {
		s.notes = append(s.notes, n.String())
		bad += n.bad
	}
	s.unnamed = max(0, bad-indexNamed-len(scan.nameless))
	return s, nil
}

// distinctCopies returns the different records among cs that decoded,
// the pages holding any copy, and the first decoding error.
func distinctCopies(cs []snapCopy) (good []storage.Record, pages []uint64, firstErr error) {
	for _, c := range cs {
		pages = append(pages, c.page)
		if c.err != nil {
			if firstErr == nil {
				firstErr = c.err
			}
			continue
		}
		dup := false
		for _, g := range good {
			dup = dup || reflect.DeepEqual(g, c.rec)
		}
		if !dup {
			good = append(good, c.rec)
		}
	}
	return good, pages, firstErr
}

// readTree reads the snapshot records bbolt's cursor can reach, each
// under its own guard.
func readTree(path string) (t treeRead, err error) {
	t.recs, t.errs = map[string]storage.Record{}, map[string]error{}
	// The library refuses a file bbolt would misread at once (and says
	// why); it also opens it read-only, never writing it.
	ro := func(o *bolt.Options) error { o.ReadOnly = true; o.Timeout = time.Second; return nil }
	ms, err := storage.NewBoltMetaStore(path, ro)
	if err != nil {
		return t, err
	}
	if err := ms.Close(); err != nil {
		return t, err
	}
	var db *bolt.DB
	if err := guard(func() (err error) {
		db, err = bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: time.Second})
		return err
	}); err != nil {
		return t, err
	}
	defer func() { _ = guard(db.Close) }()
	var tx *bolt.Tx
	if err := guard(func() (err error) { tx, err = db.Begin(false); return err }); err != nil {
		return t, err
	}
	defer func() { _ = guard(tx.Rollback) }()
	var snaps *bolt.Bucket
	if err := guard(func() error {
		if v := tx.Bucket([]byte(storage.KeyVersion)); v != nil {
			snaps = v.Bucket([]byte(storage.KeySnapshots))
			if snaps != nil {
				t.seq = snaps.Sequence()
			}
		}
		return nil
	}); err != nil {
		return t, err
	}
	t.opened = true
	if snaps == nil {
		t.complete = true
		return t, nil
	}
	// The names first, as far as the cursor reaches; then each record.
	if err := guard(func() error {
		c := snaps.Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			t.names = append(t.names, string(k))
		}
		return nil
	}); err == nil {
		t.complete = true
	}
	for _, name := range t.names {
		var rec storage.Record
		err := guard(func() (err error) { rec, _, err = decodeRaw(snaps, name); return err })
		if err != nil {
			t.errs[name] = err
			continue
		}
		t.recs[name] = rec
	}
	return t, nil
}

// decodeRaw reads the snapshot bucket name in containerd's layout, with
// the rules the page scan uses (snapFields.record).
func decodeRaw(snaps *bolt.Bucket, name string) (storage.Record, uint64, error) {
	sb := snaps.Bucket([]byte(name))
	if sb == nil {
		return storage.Record{Name: name}, 0, errors.New("not a snapshot bucket")
	}
	f := snapFields{vals: map[string][]byte{}, buckets: map[string]bool{}}
	if err := sb.ForEach(func(k, v []byte) error {
		if v == nil {
			f.buckets[string(k)] = true
			return nil
		}
		f.vals[string(k)] = v
		return nil
	}); err != nil {
		return storage.Record{Name: name}, 0, err
	}
	if lb := sb.Bucket([]byte(storage.KeyLabels)); lb != nil {
		f.labelsErr = lb.ForEach(func(k, v []byte) error {
			if f.labels == nil {
				f.labels = map[string]string{}
			}
			f.labels[string(k)] = string(v)
			return nil
		})
	}
	return f.record(name)
}

// keepConsistent orders recs parents first and keeps only those whose
// chain is whole: the parent kept and committed, the ID not taken by a kept
// record. The others are lost, with the reason.
func keepConsistent(recs []storage.Record) (kept []storage.Record, lost []string) {
	byName := map[string]storage.Record{}
	for _, r := range recs {
		byName[r.Name] = r
	}
	children := map[string][]string{}
	var roots []string
	for _, r := range recs {
		if r.Parent == "" {
			roots = append(roots, r.Name)
		} else {
			children[r.Parent] = append(children[r.Parent], r.Name)
		}
	}
	keptNames, reported := map[string]bool{}, map[string]bool{}
	lose := func(name, format string, args ...any) {
		if !reported[name] {
			reported[name] = true
			lost = append(lost, fmt.Sprintf("%q: ", name)+fmt.Sprintf(format, args...))
		}
	}
	var markLost func(name string)
	markLost = func(name string) {
		for _, c := range children[name] {
			lose(c, "its ancestor %q was lost", name)
			markLost(c)
		}
	}
	ids := map[string]string{}
	var visit func(name string)
	visit = func(name string) {
		r := byName[name]
		if other, ok := ids[r.ID]; ok {
			lose(name, "ID %s is %q's too", r.ID, other)
		} else {
			ids[r.ID] = name
			keptNames[name] = true
			kept = append(kept, r)
		}
		for _, c := range children[name] {
			switch {
			case !keptNames[name]:
				lose(c, "its parent %q was lost", name)
				markLost(c)
			case r.Kind != snapshots.KindCommitted:
				lose(c, "its parent %q is not committed", name)
				markLost(c)
			default:
				visit(c)
			}
		}
	}
	for _, name := range roots {
		visit(name)
	}
	// Records never reached from a root: their parent was lost.
	var orphans []string
	for _, r := range recs {
		if _, ok := byName[r.Parent]; r.Parent != "" && !ok {
			orphans = append(orphans, r.Name)
		}
	}
	sort.Strings(orphans)
	for _, name := range orphans {
		lose(name, "its parent %q was lost", byName[name].Parent)
		markLost(name)
	}
	// What is left is in a loop of parents: no chain can be kept.
	for _, r := range recs {
		if !keptNames[r.Name] {
			lose(r.Name, "its chain of parents loops")
		}
	}
	return kept, lost
}

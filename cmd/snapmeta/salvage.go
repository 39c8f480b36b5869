package main

import (
	"context"
	binenc "encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sort"
	"strconv"
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

The damaged file is opened read-only and never written. Each record is read
under its own guard: a record that cannot be read is skipped and reported.
A record whose parent was lost (or is not committed, or whose ID another
record already has) cannot keep a consistent chain: it is reported lost,
with the reason. The new file passes 'snapmeta check', and its ID allocator
is raised above the highest ID seen, so no lost ID is handed out again.

A file cut short (truncated) usually yields little: bbolt writes the root
of its tree last, at the end of the file, so the records are out of reach;
salvage then says so and creates nothing.

Exit code 0: everything copied. 1: something lost (listed on stdout) or
nothing readable. 2: usage error.`,
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
	recs    []storage.Record
	lost    []string // one line each
	highest uint64
}

func (a *app) salvage(ctx context.Context, from, to string) error {
	s, err := readDamaged(from)
	if err != nil {
		return fmt.Errorf("nothing could be read from %s: %w", from, err)
	}
	recs, lost := keepConsistent(s.recs)
	s.lost = append(s.lost, lost...)
	ms, err := storage.NewBoltMetaStore(to)
	if err != nil {
		return err
	}
	err = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		if err := storage.Import(ctx, recs...); err != nil {
			return err
		}
		return storage.RaiseIDs(ctx, s.highest)
	})
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
	fmt.Fprintf(a.stdout, "salvaged %d snapshot(s) to %s, %d lost\n", len(recs), to, len(s.lost))
	if len(s.lost) > 0 {
		return &exitError{code: 1, err: fmt.Errorf("%d record(s) lost", len(s.lost))}
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

// readDamaged reads every snapshot record of the file at path that can be
// read, each under its own guard.
func readDamaged(path string) (*salvaged, error) {
	// The library refuses a file bbolt would misread at once (and says
	// why); it also opens it read-only, never writing it.
	ro := func(o *bolt.Options) error { o.ReadOnly = true; o.Timeout = time.Second; return nil }
	ms, err := storage.NewBoltMetaStore(path, ro)
	if err != nil {
		return nil, err
	}
	if err := ms.Close(); err != nil {
		return nil, err
	}
	var db *bolt.DB
	if err := guard(func() (err error) {
		db, err = bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: time.Second})
		return err
	}); err != nil {
		return nil, err
	}
	defer func() { _ = guard(db.Close) }()
	s := &salvaged{}
	var tx *bolt.Tx
	if err := guard(func() (err error) { tx, err = db.Begin(false); return err }); err != nil {
		return nil, err
	}
	defer func() { _ = guard(tx.Rollback) }()
	var snaps *bolt.Bucket
	if err := guard(func() error {
		if v := tx.Bucket([]byte(storage.KeyVersion)); v != nil {
			snaps = v.Bucket([]byte(storage.KeySnapshots))
			if snaps != nil {
				s.highest = snaps.Sequence()
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if snaps == nil {
		return s, nil
	}
	// The names first, as far as the cursor reaches; then each record.
	var names []string
	if err := guard(func() error {
		c := snaps.Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			names = append(names, string(k))
		}
		return nil
	}); err != nil {
		s.lost = append(s.lost, fmt.Sprintf("the records after %s, count unknown: %v", lastName(names), err))
	}
	for _, name := range names {
		var rec storage.Record
		var id uint64
		err := guard(func() (err error) { rec, id, err = decodeRaw(snaps, name); return err })
		if err != nil {
			s.lost = append(s.lost, fmt.Sprintf("%q: %v", name, err))
			continue
		}
		s.highest = max(s.highest, id)
		s.recs = append(s.recs, rec)
	}
	return s, nil
}

func lastName(names []string) string {
	if len(names) == 0 {
		return "the start"
	}
	return strconv.Quote(names[len(names)-1])
}

// decodeRaw reads the snapshot bucket name in containerd's layout.
func decodeRaw(snaps *bolt.Bucket, name string) (storage.Record, uint64, error) {
	rec := storage.Record{Name: name}
	sb := snaps.Bucket([]byte(name))
	if sb == nil {
		return rec, 0, errors.New("not a snapshot bucket")
	}
	id, n := binenc.Uvarint(sb.Get([]byte(storage.KeyID)))
	if n <= 0 || id == 0 {
		return rec, 0, errors.New("no ID")
	}
	rec.ID = strconv.FormatUint(id, 10)
	kind := sb.Get([]byte(storage.KeyKind))
	if len(kind) != 1 {
		return rec, 0, errors.New("no kind")
	}
	rec.Kind = snapshots.Kind(kind[0])
	rec.Parent = string(sb.Get([]byte(storage.KeyParent)))
	for key, t := range map[string]*time.Time{storage.KeyCreatedAt: &rec.Created, storage.KeyUpdatedAt: &rec.Updated} {
		if v := sb.Get([]byte(key)); v != nil {
			if err := t.UnmarshalBinary(v); err != nil {
				return rec, 0, fmt.Errorf("bad %s: %v", key, err)
			}
			*t = t.UTC()
		}
	}
	if v := sb.Get([]byte(storage.KeyInodes)); v != nil {
		rec.Usage.Inodes, _ = binenc.Varint(v)
	}
	if v := sb.Get([]byte(storage.KeySize)); v != nil {
		rec.Usage.Size, _ = binenc.Varint(v)
	}
	if lb := sb.Bucket([]byte(storage.KeyLabels)); lb != nil {
		rec.Labels = map[string]string{}
		if err := lb.ForEach(func(k, v []byte) error { rec.Labels[string(k)] = string(v); return nil }); err != nil {
			return rec, 0, err
		}
	}
	return rec, id, nil
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

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// The kinds of disagreement doctor reports, in the order it reports them.
// They are the "kind" of a finding in --json.
const (
	// findUnreferenced is a snapshot of the store that no namespace of
	// containerd's database refers to: its garbage collector removes it.
	findUnreferenced = "unreferenced"
	// findMissingFromStore is a reference in containerd's database to a
	// snapshot the store does not hold.
	findMissingFromStore = "missing_from_store"
	// findOrphanDirectory is a directory named by an ID no snapshot has.
	findOrphanDirectory = "orphan_directory"
	// findMissingDirectory is a snapshot whose directory is not there.
	findMissingDirectory = "missing_directory"
	// findLeftoverDirectory is an entry under snapshots/ that is not named
	// by an ID at all: a temporary directory (new-*, rm-*) a crashed driver
	// left.
	findLeftoverDirectory = "leftover_directory"
)

// findingKinds are the kinds in report order, with their section titles.
var findingKinds = []struct{ kind, title string }{
	{findUnreferenced, "snapshots containerd does not refer to (its garbage collector will remove them)"},
	{findMissingFromStore, "references containerd holds to snapshots the store lacks"},
	{findOrphanDirectory, "directories with no snapshot"},
	{findMissingDirectory, "snapshots with no directory"},
	{findLeftoverDirectory, "leftover temporary directories (not snapshot IDs)"},
}

// finding is one disagreement. Which fields are set depends on the kind.
type finding struct {
	Kind string `json:"kind"`
	// Host is the host scope of Snapshot on a host-scoped root.
	Host string `json:"host,omitempty"`
	// Snapshot is the snapshot's name in the store (containerd's backend
	// name, namespace/N/key for snapshots containerd made).
	Snapshot     string `json:"snapshot,omitempty"`
	ID           string `json:"id,omitempty"`
	SnapshotKind string `json:"snapshot_kind,omitempty"`
	// Namespace and Key are where containerd's database holds the
	// reference (missing_from_store).
	Namespace string `json:"namespace,omitempty"`
	Key       string `json:"key,omitempty"`
	// Path is the directory (the directory kinds).
	Path   string `json:"path,omitempty"`
	Detail string `json:"detail,omitempty"`
}

// doctorReport is what doctor writes; with --json as is. Findings is never
// null.
type doctorReport struct {
	OK           bool   `json:"ok"`
	Store        string `json:"store"`
	Snapshots    int    `json:"snapshots"`
	ContainerdDB string `json:"containerd_db,omitempty"`
	Snapshotter  string `json:"snapshotter,omitempty"`
	// References is the number of containerd's references to the
	// snapshotter, over all namespaces (with --containerd-db only).
	References *int      `json:"references,omitempty"`
	Root       string    `json:"root,omitempty"`
	Findings   []finding `json:"findings"`
}

// storeSnapshot is what doctor needs of a snapshot of the store.
type storeSnapshot struct {
	host, name, id, parent string
	kind                   snapshots.Kind
}

// containerdRef is one snapshot entry of containerd's database.
type containerdRef struct {
	namespace, key, name string
}

func (a *app) doctorCommand() *cobra.Command {
	var addr, dbPath, snapshotter, root, host string
	var lockTimeout time.Duration
	var asJSON bool
	c := &cobra.Command{
		Use:   "doctor [STORE] [--containerd-db META.DB --snapshotter NAME] [--root DIR]",
		Short: "Reconcile the store with containerd's meta.db and the driver's directories",
		Long: `Compare the snapshotter's store with containerd's metadata database and with
the driver's snapshot directories, and report where they disagree. Doctor
only reads; it changes nothing.

With --containerd-db (containerd's meta.db, usually
/var/lib/containerd/io.containerd.metadata.v1.bolt/meta.db) and
--snapshotter (the name containerd knows the snapshotter by, as in
'ctr snapshots --snapshotter NAME'), it reports:

  unreferenced        snapshots of the store no namespace of meta.db refers
                      to: containerd's garbage collector removes them (one
                      with a referenced descendant it fails to remove, and
                      the report says so);
  missing_from_store  references meta.db holds to snapshots the store
                      lacks ('missing parent' and 'not found' errors).

With --root (the driver's root: the directory that holds snapshots/, as
for nativesnap, overlaysnap and containerd's native and overlayfs drivers,
which keep snapshot N in <root>/snapshots/N), it reports:

  orphan_directory    directories named by an ID no snapshot has;
  missing_directory   snapshots whose directory is gone (a view of a parent
                      is not expected to have one: the native drivers mount
                      the parent's);
  leftover_directory  entries whose name is no ID, such as the new-* and
                      rm-* directories a driver killed mid-copy or mid-removal
                      leaves.

meta.db is opened read-only, which needs a shared lock; a running
containerd holds an exclusive one. Run doctor with containerd stopped, or on
a copy of meta.db: after --lock-timeout it gives up with an error rather
than wait. A bbolt store is likewise locked while its snapshotter runs.
Both should be read with nothing writing them, or doctor reports what is in
flight.

Doctor does not check the store's own invariants: 'snapmeta check' does. A
store with records it cannot read is refused (exit 2).

Exit code 0: everything agrees. 1: one or more findings. 2: a usage error,
or a store, database or directory that cannot be read. --json writes one
JSON object, for 0 and 1 alike: {"ok", "store", "snapshots",
"containerd_db", "snapshotter", "references", "root", "findings": [{"kind",
"snapshot", "id", "snapshot_kind", "namespace", "key", "path", "detail"}]},
fields that do not apply left out.

On a host-scoped etcd root (many hosts on one root) the data directory is
shared by every host: a directory is orphaned only if its ID is in no
host's scope, and missing directories are reported for every host's
snapshots (--host H: for H's only), each finding with its "host".
containerd's database is one host's: with --containerd-db, --host names
that host, and unreferenced and missing_from_store judge its scope alone.`,
		Example: `  snapmeta doctor /var/lib/snapmeta/metadata.db \
      --containerd-db /var/lib/containerd/io.containerd.metadata.v1.bolt/meta.db \
      --snapshotter snapmeta --root /var/lib/snapmeta
  snapmeta doctor --store etcd://10.0.0.5:2379/snapshots --root /var/lib/snapmeta
  snapmeta doctor metadata.db --containerd-db meta.db --snapshotter native --json | jq -r '.findings[] | select(.kind=="unreferenced") | .snapshot'`,
		Args: storeArgs,
		RunE: func(c *cobra.Command, args []string) error {
			if err := a.positionalStore(c, &addr, args); err != nil {
				return err
			}
			if err := checkDoctorFlags(c, dbPath, snapshotter, root, lockTimeout); err != nil {
				return err
			}
			report := doctorReport{Store: addr, ContainerdDB: dbPath, Snapshotter: snapshotter, Root: root, Findings: []finding{}}
			var refs []containerdRef
			if dbPath != "" {
				var err error
				if refs, err = readContainerdRefs(dbPath, snapshotter, lockTimeout); err != nil {
					return err
				}
				n := len(refs)
				report.References = &n
			}
			// snaps are the snapshots judged (--host's scope, or all);
			// all those of every scope, which the directories are shared by.
			var snaps, all []storeSnapshot
			err := a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				if v.scoped && dbPath != "" && host == "" {
					return usageErrorf("--containerd-db on a host-scoped etcd root needs --host: containerd's database is one host's (hosts: %s)", hostList(v.hostNames()))
				}
				for _, s := range v.scopes {
					ss, err := readStoreSnapshots(c.Context(), s.ms, s.host)
					if err != nil {
						return err
					}
					snaps = append(snaps, ss...)
				}
				all = snaps
				if !v.scoped || host == "" {
					return nil
				}
				all = slices.Clone(snaps)
				for _, h := range v.hostNames() {
					if h == host {
						continue
					}
					ms, err := storage.NewEtcdStoreFromClient(v.cli, v.addr.Root, storage.WithHostView(h))
					if err != nil {
						return err
					}
					ss, err := readStoreSnapshots(c.Context(), ms, h)
					ms.Close()
					if err != nil {
						return err
					}
					all = append(all, ss...)
				}
				return nil
			})
			if err != nil {
				if _, ok := err.(*usageError); ok {
					return err
				}
				return &exitError{code: 2, err: err}
			}
			report.Snapshots = len(snaps)
			if dbPath != "" {
				report.Findings = append(report.Findings, reconcileRefs(snaps, refs)...)
			}
			if root != "" {
				found, err := reconcileDirs(snaps, all, root)
				if err != nil {
					return &exitError{code: 2, err: err}
				}
				report.Findings = append(report.Findings, found...)
			}
			report.OK = len(report.Findings) == 0
			var werr error
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				enc.SetEscapeHTML(false)
				enc.SetIndent("", "  ")
				werr = enc.Encode(report)
			} else {
				werr = writeDoctorText(a.stdout, report)
			}
			if !report.OK {
				return &exitError{code: 1, err: fmt.Errorf("%d disagreement(s) found", len(report.Findings))}
			}
			return werr
		},
	}
	storeFlag(c, &addr)
	c.Flags().StringVar(&dbPath, "containerd-db", "", "containerd's metadata database (meta.db), opened read-only")
	c.Flags().StringVar(&snapshotter, "snapshotter", "", "the snapshotter's name in containerd's database (with --containerd-db)")
	c.Flags().StringVar(&root, "root", "", "the driver's root: the directory that holds snapshots/")
	c.Flags().DurationVar(&lockTimeout, "lock-timeout", storeaddr.BoltLockTimeout, "how long to wait for containerd's lock on --containerd-db")
	c.Flags().BoolVar(&asJSON, "json", false, "write the report as one JSON object")
	hostFlag(c, &host, "on a host-scoped etcd root: the host whose snapshots are judged (needed with --containerd-db)")
	return c
}

// checkDoctorFlags refuses combinations of doctor's flags that cannot work
// and paths that do not exist, before anything is opened.
func checkDoctorFlags(c *cobra.Command, dbPath, snapshotter, root string, lockTimeout time.Duration) error {
	see := fmt.Sprintf("(see '%s --help')", c.CommandPath())
	switch {
	case dbPath == "" && root == "":
		return usageErrorf("doctor needs --containerd-db and --snapshotter, or --root, or both %s", see)
	case dbPath != "" && snapshotter == "":
		return usageErrorf("--containerd-db needs --snapshotter, the name containerd knows the snapshotter by %s", see)
	case dbPath == "" && snapshotter != "":
		return usageErrorf("--snapshotter is the snapshotter's name in --containerd-db, which is not given %s", see)
	case lockTimeout <= 0:
		return usageErrorf("--lock-timeout must be positive, not %v %s", lockTimeout, see)
	}
	if dbPath != "" {
		fi, err := os.Stat(dbPath)
		switch {
		case err != nil:
			return usageErrorf("--containerd-db %s: %v", dbPath, pathErr(err))
		case fi.IsDir():
			return usageErrorf("--containerd-db %s is a directory; containerd's database is the file meta.db in it", dbPath)
		}
	}
	if root != "" {
		fi, err := os.Stat(root)
		switch {
		case err != nil:
			return usageErrorf("--root %s: %v", root, pathErr(err))
		case !fi.IsDir():
			return usageErrorf("--root %s is not a directory", root)
		}
		if fi, err := os.Stat(filepath.Join(root, "snapshots")); err != nil || !fi.IsDir() {
			hint := ""
			if filepath.Base(filepath.Clean(root)) == "snapshots" {
				hint = fmt.Sprintf("; give %s instead", filepath.Dir(filepath.Clean(root)))
			}
			return usageErrorf("--root %s holds no snapshots/ directory: --root is the driver's root, the directory that holds snapshots/%s", root, hint)
		}
	}
	return nil
}

// pathErr is err without the path an *fs.PathError repeats.
func pathErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		if errors.Is(err, fs.ErrNotExist) {
			return errors.New("no such file or directory")
		}
		return pe.Err
	}
	return err
}

// readStoreSnapshots reads every snapshot of the store in one read-only
// transaction. A record that cannot be read makes the comparison
// unreliable (its ID is unknown, so its directory would look orphaned), so
// it is an error.
// host is the scope's host ("" without host scopes).
func readStoreSnapshots(ctx context.Context, ms storage.MetaStore, host string) ([]storeSnapshot, error) {
	var snaps []storeSnapshot
	err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		snaps = snaps[:0]
		return storage.Walk(ctx, func(r storage.Record) error {
			snaps = append(snaps, storeSnapshot{host: host, name: r.Name, id: r.ID, parent: r.Parent, kind: r.Kind})
			return nil
		})
	})
	var ce *storage.CorruptRecordsError
	if errors.As(err, &ce) {
		return nil, fmt.Errorf("the store has %d snapshot(s) that cannot be read; doctor compares only a store it can read whole (see 'snapmeta check' and 'snapmeta salvage')", len(ce.Records))
	}
	return snaps, err
}

// readContainerdRefs reads every snapshot entry of the snapshotter named
// snapshotter in containerd's database at path, over all namespaces:
// v1/<namespace>/snapshots/<snapshotter>/<key>, whose "name" is the
// snapshot's name in the snapshotter (its backend name). The database is
// opened read-only; a lock held longer than lockTimeout (a running
// containerd's) is an error.
func readContainerdRefs(path, snapshotter string, lockTimeout time.Duration) ([]containerdRef, error) {
	db, err := bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: lockTimeout})
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return nil, &exitError{code: 2, err: fmt.Errorf("containerd's database %s is locked: a running containerd holds it (waited %v); stop containerd, or copy the file and give the copy to --containerd-db", path, lockTimeout)}
	case err != nil:
		return nil, &exitError{code: 2, err: fmt.Errorf("containerd's database %s cannot be opened: %w", path, err)}
	}
	defer db.Close()
	var refs []containerdRef
	known := map[string]bool{} // every snapshotter meta.db names
	err = db.View(func(tx *bolt.Tx) error {
		v1 := tx.Bucket([]byte("v1"))
		if v1 == nil || v1.Get([]byte("version")) == nil {
			what := "it has no v1/version"
			if v1 != nil && (v1.Bucket([]byte(storage.KeyParents)) != nil || v1.Bucket([]byte(storage.KeySnapshots)) != nil) {
				what = "it is a snapshotter's store"
			}
			return fmt.Errorf("%s is not containerd's metadata database (%s); containerd's is usually /var/lib/containerd/io.containerd.metadata.v1.bolt/meta.db", path, what)
		}
		return v1.ForEachBucket(func(ns []byte) error {
			snaps := v1.Bucket(ns).Bucket([]byte("snapshots"))
			if snaps == nil {
				return nil
			}
			_ = snaps.ForEachBucket(func(name []byte) error {
				known[string(name)] = true
				return nil
			})
			b := snaps.Bucket([]byte(snapshotter))
			if b == nil {
				return nil
			}
			return b.ForEachBucket(func(key []byte) error {
				// containerd's own garbage collector skips an entry
				// without a name; so does doctor.
				if name := b.Bucket(key).Get([]byte("name")); len(name) > 0 {
					refs = append(refs, containerdRef{namespace: string(ns), key: string(key), name: string(name)})
				}
				return nil
			})
		})
	})
	if err != nil {
		return nil, &exitError{code: 2, err: err}
	}
	if !known[snapshotter] && len(known) > 0 {
		// A mistyped name would report every snapshot as unreferenced.
		names := slices.Sorted(func(yield func(string) bool) {
			for n := range known {
				if !yield(n) {
					return
				}
			}
		})
		return nil, usageErrorf("containerd's database %s has no snapshot of snapshotter %q in any namespace; it has snapshots of %s", path, snapshotter, strings.Join(names, ", "))
	}
	return refs, nil
}

// reconcileRefs compares the store's snapshots with containerd's
// references, as containerd's garbage collector does: a snapshot whose
// name no reference holds is removed.
func reconcileRefs(snaps []storeSnapshot, refs []containerdRef) []finding {
	referenced := map[string]bool{}
	for _, r := range refs {
		referenced[r.name] = true
	}
	byName := map[string]bool{}
	children := map[string][]string{}
	for _, s := range snaps {
		byName[s.name] = true
		if s.parent != "" {
			children[s.parent] = append(children[s.parent], s.name)
		}
	}
	// kept reports whether name or one of its descendants is referenced:
	// the collector removes children first, and fails to remove a snapshot
	// that still has one.
	keptMemo := map[string]string{}
	var keptBy func(name string) string
	keptBy = func(name string) string {
		if k, ok := keptMemo[name]; ok {
			return k
		}
		keptMemo[name] = ""
		k := ""
		if referenced[name] {
			k = name
		} else {
			for _, c := range children[name] {
				if k = keptBy(c); k != "" {
					break
				}
			}
		}
		keptMemo[name] = k
		return k
	}
	var out []finding
	for _, s := range snaps {
		if referenced[s.name] {
			continue
		}
		f := finding{Kind: findUnreferenced, Host: s.host, Snapshot: s.name, ID: s.id, SnapshotKind: Kind(s.kind).String()}
		if k := keptBy(s.name); k != "" {
			f.Detail = fmt.Sprintf("the garbage collector will fail to remove it: %q, which containerd refers to, descends from it", k)
		}
		out = append(out, f)
	}
	var missing []finding
	for _, r := range refs {
		if !byName[r.name] {
			missing = append(missing, finding{Kind: findMissingFromStore, Snapshot: r.name, Namespace: r.namespace, Key: r.key})
		}
	}
	slices.SortFunc(missing, func(x, y finding) int {
		return strings.Compare(x.Namespace+"\x00"+x.Key, y.Namespace+"\x00"+y.Key)
	})
	slices.SortFunc(out, func(x, y finding) int { return strings.Compare(x.Snapshot, y.Snapshot) })
	return append(out, missing...)
}

// reconcileDirs compares the store's IDs with the entries of
// <root>/snapshots.
// A directory is orphaned when no snapshot of all has its ID; a missing
// directory is reported for snaps (on a host-scoped root all is every
// host's snapshots, snaps those judged).
func reconcileDirs(snaps, all []storeSnapshot, root string) ([]finding, error) {
	dir := filepath.Join(root, "snapshots")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", dir, err)
	}
	ids := map[string]bool{}
	for _, s := range all {
		ids[s.id] = true
	}
	present := map[string]bool{}
	var orphans, leftovers []finding
	for _, e := range entries {
		name := e.Name()
		present[name] = true
		path := filepath.Join(dir, name)
		switch {
		case !isDecimalID(name):
			leftovers = append(leftovers, finding{Kind: findLeftoverDirectory, Path: path})
		case !ids[name]:
			orphans = append(orphans, finding{Kind: findOrphanDirectory, ID: name, Path: path})
		}
	}
	var missing []finding
	for _, s := range snaps {
		if present[s.id] || (s.kind == snapshots.KindView && s.parent != "") {
			continue
		}
		missing = append(missing, finding{Kind: findMissingDirectory, Host: s.host, Snapshot: s.name, ID: s.id, SnapshotKind: Kind(s.kind).String(), Path: filepath.Join(dir, s.id)})
	}
	byID := func(x, y finding) int {
		a, _ := strconv.ParseUint(x.ID, 10, 64)
		b, _ := strconv.ParseUint(y.ID, 10, 64)
		return cmpUint(a, b)
	}
	slices.SortFunc(orphans, byID)
	slices.SortFunc(missing, byID)
	out := append(orphans, missing...)
	return append(out, leftovers...), nil // ReadDir sorts leftovers by name
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// isDecimalID reports whether name is how the store writes an ID: decimal
// digits, no sign, no leading zero.
func isDecimalID(name string) bool {
	n, err := strconv.ParseUint(name, 10, 64)
	return err == nil && strconv.FormatUint(n, 10) == name
}

// writeDoctorText writes the report as a summary and one section per kind
// of finding.
func writeDoctorText(w io.Writer, r doctorReport) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "store:\t%s (%d snapshots)\n", r.Store, r.Snapshots)
	if r.ContainerdDB != "" {
		fmt.Fprintf(tw, "containerd:\t%s, snapshotter %q (%d references)\n", r.ContainerdDB, r.Snapshotter, *r.References)
	}
	if r.Root != "" {
		fmt.Fprintf(tw, "root:\t%s\n", r.Root)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, k := range findingKinds {
		var group []finding
		for _, f := range r.Findings {
			if f.Kind == k.kind {
				group = append(group, f)
			}
		}
		if len(group) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s: %d\n", k.title, len(group))
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		switch k.kind {
		case findUnreferenced:
			fmt.Fprintln(tw, "  SNAPSHOT\tID\tKIND\tNOTE")
			for _, f := range group {
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", qualify(f.Host, f.Snapshot), f.ID, f.SnapshotKind, dash(f.Detail))
			}
		case findMissingFromStore:
			fmt.Fprintln(tw, "  NAMESPACE\tKEY\tSNAPSHOT")
			for _, f := range group {
				fmt.Fprintf(tw, "  %s\t%s\t%s\n", f.Namespace, f.Key, f.Snapshot)
			}
		case findMissingDirectory:
			fmt.Fprintln(tw, "  SNAPSHOT\tID\tKIND\tDIRECTORY")
			for _, f := range group {
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", qualify(f.Host, f.Snapshot), f.ID, f.SnapshotKind, f.Path)
			}
		default:
			for _, f := range group {
				fmt.Fprintf(tw, "  %s\n", f.Path)
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if r.OK {
		_, err := fmt.Fprintln(w, "\nok: they agree")
		return err
	}
	return nil
}

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

func (a *app) demoCommand() *cobra.Command {
	var useEtcd, keep bool
	c := &cobra.Command{
		Use:   "demo [ADDRESS]",
		Short: "Walk through what a snapshotter stores, step by step",
		Long: `Run a small, realistic session against a store and explain each step:
unpack a four-layer image (active snapshots committed one by one), start a
container on it, open a read-only view, show the tree, commit the
container, remove what is no longer needed, and check the result.

Without ADDRESS the demo uses a new bbolt file in a temporary directory
(removed afterwards unless --keep); with --etcd it starts an etcd server
inside this process instead. With ADDRESS it uses that store, which must
hold no snapshots.

On etcd (--etcd, or an etcd ADDRESS) a last step shows what etcd is for:
two clients, as two hosts would, open the same root; they race for one
name (the first to commit wins, the other's commit fails with a conflict
and its retry finds the name taken), and both increment one label, the
slower one's transaction conflicting and being run again by WithTransaction,
so that no increment is lost. With --etcd a step more shows host scopes,
on a second root of the embedded etcd: two hosts each open the root as
themselves (storage.WithHost) and see only their own snapshots; a layer
one host commits with storage.CommitShared the other binds with
storage.BindLayer (the same ID: one directory, unpacked once), and
storage.Release says when its data may go (with the last binding).

--keep keeps the temporary bbolt file. With --etcd it is refused: the
embedded etcd lives inside this process, and its data goes with it; to keep
an etcd demo, run it on an etcd of your own (snapmeta demo
etcd://127.0.0.1:2379/demo).`,
		Example: `  snapmeta demo
  snapmeta demo --etcd
  snapmeta demo --keep            # then inspect the file it names
  snapmeta demo bolt:///tmp/demo.db`,
		Args: maxArgs(1, "one ADDRESS"),
		RunE: func(c *cobra.Command, args []string) error {
			ctx := c.Context()
			if keep && useEtcd {
				return usageErrorf("--keep keeps the demo's bbolt file; the embedded etcd of --etcd ends with the demo, data and all (to keep an etcd demo, run it on your own etcd: snapmeta demo etcd://HOST:2379/ROOT)")
			}
			var ms, hostB storage.MetaStore
			var where string
			// openHost opens a host's scope of a second root (embedded
			// etcd only: it writes a root of its own).
			var openHost func(host string) (storage.MetaStore, error)
			switch {
			case len(args) == 1:
				if useEtcd {
					return usageErrorf("give an ADDRESS or --etcd, not both")
				}
				st, err := a.open(ctx, args[0], storeaddr.ReadWrite)
				if err != nil {
					return err
				}
				ms, where = st, st.addr.String()
				if st.addr.Engine == storeaddr.Etcd {
					b, err := a.open(ctx, args[0], storeaddr.ReadWrite)
					if err != nil {
						st.Close()
						return err
					}
					defer b.Close()
					hostB = b
				}
			case useEtcd:
				fmt.Fprintln(a.stdout, "Starting an etcd server inside this process ...")
				cl, err := etcdtest.New()
				if err != nil {
					return fmt.Errorf("start embedded etcd: %w", err)
				}
				defer cl.Close()
				cfg := cl.ClientConfig()
				ems, err := storage.NewEtcdStore("snapmeta-demo", &cfg)
				if err != nil {
					return err
				}
				// A second client on the same root, as another host opens it.
				cfgB := cl.ClientConfig()
				bms, err := storage.NewEtcdStore("snapmeta-demo", &cfgB)
				if err != nil {
					ems.Close()
					return err
				}
				defer bms.Close()
				hostB = bms
				openHost = func(host string) (storage.MetaStore, error) {
					cfg := cl.ClientConfig()
					return storage.NewEtcdStore("snapmeta-demo-hosts", &cfg, storage.WithHost(host))
				}
				ms, where = ems, "etcd://"+strings.Join(trimScheme(cfg.Endpoints), ",")+"/snapmeta-demo (embedded, gone when the demo ends)"
			default:
				dir, err := os.MkdirTemp("", "snapmeta-demo-")
				if err != nil {
					return err
				}
				if !keep {
					defer os.RemoveAll(dir)
				}
				path := filepath.Join(dir, "metadata.db")
				bms, err := storage.NewBoltMetaStore(path)
				if err != nil {
					return err
				}
				ms, where = bms, "bolt://"+path
				if !keep {
					where += " (temporary)"
				}
			}
			err := runDemo(ctx, a.stdout, ms, hostB, openHost, where)
			if cerr := ms.Close(); err == nil {
				err = cerr
			}
			if err == nil && keep && len(args) == 0 && !useEtcd {
				path := strings.TrimPrefix(where, "bolt://")
				fmt.Fprintf(a.stdout, "\nThe store is kept. Look at it with:\n  snapmeta tree --store %s\n  snapmeta ls --store %s\n", path, path)
			}
			return err
		},
	}
	c.Flags().BoolVar(&useEtcd, "etcd", false, "run against an etcd server started inside this process")
	c.Flags().BoolVar(&keep, "keep", false, "keep the temporary bbolt file and print its path")
	return c
}

func trimScheme(eps []string) []string {
	out := make([]string, len(eps))
	for i, e := range eps {
		_, out[i], _ = strings.Cut(e, "://")
		if out[i] == "" {
			out[i] = e
		}
	}
	return out
}

// digest makes a realistic, deterministic sha256 name.
func digest(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// short abbreviates a digest for the narration.
func short(name string) string {
	if strings.HasPrefix(name, "sha256:") && len(name) > 19 {
		return name[:19] + "…"
	}
	return name
}

// demoLayer is one layer of the demo image.
type demoLayer struct {
	what   string
	size   int64
	inodes int64
}

var demoLayers = []demoLayer{
	{"debian:bookworm-slim root filesystem", 74_772_480, 6_581},
	{"nginx 1.27 packages", 47_374_336, 1_702},
	{"docker-entrypoint.sh", 4_096, 3},
	{"nginx configuration", 12_288, 9},
}

// runDemo runs the guided session on ms, which must be empty. hostB, when
// not nil, is a second client of the same etcd store: the demo then ends
// with the two racing. openHost, when not nil, opens host scopes of
// another root, for a last step on host scopes.
func runDemo(ctx context.Context, w io.Writer, ms, hostB storage.MetaStore, openHost func(string) (storage.MetaStore, error), where string) error {
	var existing int
	if err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		existing = 0
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error {
			existing++
			return nil
		})
	}); err != nil {
		return err
	}
	if existing > 0 {
		return fmt.Errorf("the demo needs a store without snapshots; this one has %d", existing)
	}

	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	step := 0
	title := func(s string, explain ...string) {
		step++
		p("")
		p("Step %d. %s", step, s)
		for _, e := range explain {
			p("        %s", e)
		}
	}
	// tx runs fn in one writable transaction.
	tx := func(fn func(ctx context.Context) error) error { return ms.WithTransaction(ctx, true, fn) }

	p("snapmeta demo on %s", where)
	p("")
	p("A snapshotter (overlayfs, native, btrfs, ...) keeps one small record per")
	p("snapshot: its kind -- active (writable), view (read-only) or committed (an")
	p("immutable layer) --, its parent, and an ID that names its directory on disk.")

	title("Unpack an image.",
		"Each layer is extracted into an active snapshot on top of the previous",
		"layer, then committed under the layer's chain ID. Committing keeps the ID,",
		"so the extracted files stay where they are.")
	parent := ""
	var chain []string
	for i, l := range demoLayers {
		chain = append(chain, fmt.Sprintf("layer %d", i+1))
		name := digest(strings.Join(chain, "/"))
		key := fmt.Sprintf("extract-%d %s", i+1, name)
		var id string
		var parentIDs []string
		err := tx(func(ctx context.Context) error {
			s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent,
				snapshots.WithLabels(map[string]string{"containerd.io/snapshot.ref": name}))
			if err != nil {
				return err
			}
			id, parentIDs = s.ID, s.ParentIDs
			return nil
		})
		if err != nil {
			return err
		}
		on := "no parent: the base layer"
		if parent != "" {
			on = "on " + short(parent) + ", parent IDs " + strings.Join(parentIDs, " ")
		}
		p("  create active %q -> id %s (%s)", fmt.Sprintf("extract-%d %s", i+1, short(name)), id, on)
		var cid string
		err = tx(func(ctx context.Context) (err error) {
			cid, err = storage.CommitActive(ctx, key, name, snapshots.Usage{Size: l.size, Inodes: l.inodes},
				snapshots.WithLabels(map[string]string{"demo/content": l.what}))
			return err
		})
		if err != nil {
			return err
		}
		p("  commit it as %q -> id %s kept; %s, %d inodes (%s)", short(name), cid, humanBytes(l.size), l.inodes, l.what)
		parent = name
	}
	top := parent

	title("Start a container.",
		"Its root filesystem is an active snapshot on the image's top layer. The",
		"driver mounts the snapshot's own directory (by ID) over its parents' (by",
		"parent IDs, immediate parent first).")
	var web storage.Snapshot
	if err := tx(func(ctx context.Context) (err error) {
		web, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "web-1", top,
			snapshots.WithLabels(map[string]string{"demo/container": "web-1"}))
		return err
	}); err != nil {
		return err
	}
	p("  create active \"web-1\" on %s -> id %s", short(top), web.ID)
	p("  mount: upper dir %s, lower dirs %s", web.ID, strings.Join(web.ParentIDs, " "))

	title("Look inside the image without changing it.",
		"A view is a read-only snapshot: lower dirs only, nothing to commit.")
	var view storage.Snapshot
	if err := tx(func(ctx context.Context) (err error) {
		view, err = storage.CreateSnapshot(ctx, snapshots.KindView, "inspect-1", top)
		return err
	}); err != nil {
		return err
	}
	p("  create view \"inspect-1\" on %s -> id %s, lower dirs %s", short(top), view.ID, strings.Join(view.ParentIDs, " "))

	title("The rules are enforced, on every engine.")
	err := tx(func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "oops", "web-1")
		return err
	})
	p("  create active on \"web-1\" (not committed) -> refused: %v", err)
	if err == nil {
		return errors.New("demo: an active parent was accepted")
	}
	err = tx(func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, top)
		return err
	})
	p("  remove %s (it has children) -> refused: %v", short(top), err)
	if err == nil {
		return errors.New("demo: a parent with children was removed")
	}

	title("The tree of snapshots:")
	if err := demoTree(ctx, w, ms); err != nil {
		return err
	}

	title("Commit the container (as 'nerdctl commit' does).",
		"The active snapshot becomes a committed layer with the same ID; a new",
		"image or container can now build on it.")
	var cid string
	committed := digest(strings.Join(append(chain, "web-1 changes"), "/"))
	if err := tx(func(ctx context.Context) (err error) {
		cid, err = storage.CommitActive(ctx, "web-1", committed, snapshots.Usage{Size: 81_920, Inodes: 14},
			snapshots.WithLabels(map[string]string{"demo/content": "changes made in web-1"}))
		return err
	}); err != nil {
		return err
	}
	p("  commit \"web-1\" as %s -> id %s kept, %s", short(committed), cid, humanBytes(81_920))

	title("Clean up: remove the view, which nothing builds on.",
		"The driver then deletes the directory named by the returned ID.")
	var rid string
	var rkind snapshots.Kind
	if err := tx(func(ctx context.Context) (err error) {
		rid, rkind, err = storage.Remove(ctx, "inspect-1")
		return err
	}); err != nil {
		return err
	}
	p("  remove \"inspect-1\" -> %s snapshot, directory %s can go", Kind(rkind), rid)

	title("The tree now:")
	if err := demoTree(ctx, w, ms); err != nil {
		return err
	}

	title("Check the store's invariants (snapmeta check).")
	problems, err := storage.Check(ctx, ms)
	if err != nil {
		return err
	}
	for _, pr := range problems {
		p("  problem: %s", pr)
	}
	if len(problems) > 0 {
		return fmt.Errorf("demo: check found %d problem(s)", len(problems))
	}
	p("  no problems")

	if hostB != nil {
		title("Two hosts, one store: what etcd is for.",
			"Every host opens the same etcd root with its own client; here a second",
			"client (host B) has opened it beside the first (host A). Transactions",
			"are optimistic: a commit fails with a conflict when another commit",
			"changed what the transaction read, and the transaction is run again.")
		if err := demoRace(ctx, p, ms, hostB, top); err != nil {
			return err
		}
	}
	if openHost != nil {
		title("Two hosts, each in its own scope.",
			"Containerd owns every snapshot its snapshotter holds, so hosts that share",
			"one etcd root each open it as themselves (storage.WithHost): each sees",
			"only its own snapshots, and IDs stay unique across the root, so drivers",
			"can share one data directory. A committed layer can be shared.")
		if err := demoHostScopes(ctx, p, openHost); err != nil {
			return err
		}
	}
	p("")
	p("Done. The same commands work on a real store: snapmeta ls, info, tree, ids,")
	p("check --store <address>; see snapmeta --help.")
	return nil
}

func demoTree(ctx context.Context, w io.Writer, ms storage.MetaStore) error {
	recs, err := loadEvery(ctx, ms, nil)
	if err != nil {
		return err
	}
	roots, loops := forest(recs)
	var b strings.Builder
	writeTree(&b, roots, loops)
	for _, line := range strings.Split(strings.TrimRight(b.String(), "\n"), "\n") {
		fmt.Fprintf(w, "  %s\n", line)
	}
	return nil
}

// demoRace shows two clients of one etcd store racing: for one name, then
// over one label read, changed and written back by both. The order is
// forced, so that the outcome is the same on every run.
func demoRace(ctx context.Context, p func(string, ...any), hostA, hostB storage.MetaStore, image string) error {
	const name, label = "build-cache", "demo/hits"
	prepare := func(ctx context.Context) (storage.Snapshot, error) {
		return storage.CreateSnapshot(ctx, snapshots.KindActive, name, image)
	}

	// The same name: A prepares it in a transaction still open, B prepares
	// it and commits first.
	actx, atx, err := hostA.TransactionContext(ctx, true)
	if err != nil {
		return err
	}
	defer atx.Rollback()
	if _, err := prepare(actx); err != nil {
		return err
	}
	p("  host A prepares %q on the image, and has not committed yet", name)
	var sb storage.Snapshot
	if err := hostB.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		sb, err = prepare(ctx)
		return err
	}); err != nil {
		return err
	}
	p("  host B prepares %q too, and commits first -> id %s (each client hands out", name, sb.ID)
	p("  IDs from a block of its own)")
	err = atx.Commit()
	if !errdefs.IsConflict(err) {
		return fmt.Errorf("demo: host A's commit after host B's: want a conflict, got %v", err)
	}
	p("  host A commits -> %v (errdefs.IsConflict)", sayClassOnce(err.Error()))
	err = hostA.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := prepare(ctx)
		return err
	})
	if !errdefs.IsAlreadyExists(err) {
		return fmt.Errorf("demo: host A's second try: want already exists, got %v", err)
	}
	p("  host A tries again -> refused: %v", sayClassOnce(err.Error()))
	p("  one name, one snapshot: host B's, id %s", sb.ID)

	// One label, read and written back by both: B's increment lands
	// between A's read and A's commit.
	increment := func(ctx context.Context) (from int, err error) {
		_, info, _, err := storage.GetInfo(ctx, name)
		if err != nil {
			return 0, err
		}
		from, _ = strconv.Atoi(info.Labels[label])
		_, err = storage.UpdateInfo(ctx, snapshots.Info{Name: name, Labels: map[string]string{label: strconv.Itoa(from + 1)}}, "labels."+label)
		return from, err
	}
	p("  both hosts add 1 to the label %s of %q, reading it and writing it back:", label, name)
	attempts := 0
	err = hostA.WithTransaction(ctx, true, func(actx context.Context) error {
		attempts++
		from, err := increment(actx)
		if err != nil {
			return err
		}
		p("    host A, attempt %d: reads %d, writes %d", attempts, from, from+1)
		if attempts > 1 {
			return nil
		}
		var bFrom int
		if err := hostB.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
			bFrom, err = increment(ctx)
			return err
		}); err != nil {
			return err
		}
		p("    host B meanwhile: reads %d, writes %d, commits", bFrom, bFrom+1)
		return nil
	})
	if err != nil {
		return err
	}
	if attempts != 2 {
		return fmt.Errorf("demo: host A's transaction ran %d time(s), want 2", attempts)
	}
	p("  host A's first attempt conflicted with host B's commit, and WithTransaction")
	p("  ran it again: it read B's value this time")
	var final string
	if err := hostB.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, name)
		final = info.Labels[label]
		return err
	}); err != nil {
		return err
	}
	p("  %s is now %s, as host B reads it: no increment lost", label, final)
	if final != "2" {
		return fmt.Errorf("demo: %s is %s, want 2", label, final)
	}
	problems, err := storage.Check(ctx, hostA)
	if err != nil {
		return err
	}
	if len(problems) > 0 {
		return fmt.Errorf("demo: check after the race found %d problem(s), the first: %s", len(problems), problems[0])
	}
	p("  check after the race: no problems")
	return nil
}

// demoHostScopes shows two hosts on one host-scoped root: separate scopes,
// a shared layer committed by one and bound by the other, and Release.
func demoHostScopes(ctx context.Context, p func(string, ...any), openHost func(string) (storage.MetaStore, error)) (err error) {
	hostA, err := openHost("node-a")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, hostA.Close()) }()
	hostB, err := openHost("node-b")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, hostB.Close()) }()
	chain := digest("demo shared layer")
	var layerID string
	if err := hostA.WithTransaction(ctx, true, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "extract", ""); err != nil {
			return err
		}
		var err error
		layerID, err = storage.CommitShared(ctx, "extract", "base", chain, snapshots.Usage{Size: 4096, Inodes: 4})
		if err != nil {
			return err
		}
		_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "web", "base")
		return err
	}); err != nil {
		return err
	}
	p("  node-a unpacks a layer, commits it as %q with CommitShared (content key", "base")
	p("  %s) -> id %s, and starts %q on it", short(chain), layerID, "web")
	var boundID string
	if err := hostB.WithTransaction(ctx, true, func(ctx context.Context) error {
		if _, err := storage.BindLayer(ctx, "base", "", chain); err != nil {
			return err
		}
		id, _, _, err := storage.GetInfo(ctx, "base")
		boundID = id
		return err
	}); err != nil {
		return err
	}
	p("  node-b needs the same layer: BindLayer binds it as its own %q -> id %s,", "base", boundID)
	p("  the same directory, nothing unpacked again")
	if boundID != layerID {
		return fmt.Errorf("demo: the binding has id %s, the layer %s", boundID, layerID)
	}
	names := func(ms storage.MetaStore) (out []string, err error) {
		err = ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			out = out[:0]
			return storage.WalkInfo(ctx, func(_ context.Context, i snapshots.Info) error {
				out = append(out, i.Name)
				return nil
			})
		})
		return out, err
	}
	na, err := names(hostA)
	if err != nil {
		return err
	}
	nb, err := names(hostB)
	if err != nil {
		return err
	}
	p("  node-a sees %s; node-b sees %s", strings.Join(na, ", "), strings.Join(nb, ", "))
	release := func(ms storage.MetaStore, key string) (last bool, err error) {
		err = ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
			_, _, last, err = storage.Release(ctx, key)
			return err
		})
		return last, err
	}
	last, err := release(hostB, "base")
	if err != nil {
		return err
	}
	p("  node-b releases its %q -> last reference: %v: node-a still uses id %s, keep its data", "base", last, layerID)
	if _, err := release(hostA, "web"); err != nil {
		return err
	}
	last, err = release(hostA, "base")
	if err != nil {
		return err
	}
	p("  node-a removes %q, then releases %q -> last reference: %v: the data of id %s may go", "web", "base", last, layerID)
	return nil
}

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
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
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
hold no snapshots.`,
		Example: `  snapmeta demo
  snapmeta demo --etcd
  snapmeta demo --keep            # then inspect the file it names
  snapmeta demo bolt:///tmp/demo.db`,
		Args: maxArgs(1, "one ADDRESS"),
		RunE: func(c *cobra.Command, args []string) error {
			ctx := c.Context()
			var ms storage.MetaStore
			var where string
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
			err := runDemo(ctx, a.stdout, ms, where)
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

// runDemo runs the guided session on ms, which must be empty.
func runDemo(ctx context.Context, w io.Writer, ms storage.MetaStore, where string) error {
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

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

// defaultBatch is how many snapshots one transaction of import and migrate
// writes. Each costs an etcd transaction about two writes and a guard or
// two, so 32 stays well inside etcd's default of 128 operations per
// transaction; a batch the engine still refuses as too large is split.
const defaultBatch = 32

// maxBatch bounds --batch.
const maxBatch = 10000

// maxEtcdBatch is the most snapshots one etcd transaction of import holds
// with etcd's default --max-txn-ops: a snapshot with a parent is two writes
// (its record and its entry in the parent's children index), and the
// transaction adds up to two of its own (the ID floor, a marker). Guards
// do not count: the store merges them into ranges past the limit. A larger
// --batch would be split, so a batch would no longer be one transaction.
const maxEtcdBatch = (storage.DefaultEtcdMaxTxnOps - 2) / 2

// checkBatch refuses a --batch the target cannot write in one transaction.
// It refuses rather than clamps: each batch is promised to be one
// transaction, and a smaller batch than asked for should be asked for.
func checkBatch(batch int, target string) error {
	if batch < 1 || batch > maxBatch {
		return usageErrorf("--batch must be between 1 and %d", maxBatch)
	}
	if ad, err := storeaddr.Parse(target); err == nil && ad.Engine == storeaddr.Etcd && batch > maxEtcdBatch {
		return usageErrorf("--batch %d is more than one etcd transaction holds: at most %d snapshots on etcd (two writes each, of etcd's default --max-txn-ops %d); give --batch %d or less", batch, maxEtcdBatch, storage.DefaultEtcdMaxTxnOps, maxEtcdBatch)
	}
	return nil
}

func (a *app) exportCommand() *cobra.Command {
	var addr, output, host string
	c := &cobra.Command{
		Use:   "export [STORE]",
		Short: "Write every snapshot as JSON Lines",
		Long: `Write every snapshot of the store, read in one transaction, as JSON Lines:
one object per line with every field (name, id, kind, parent, labels,
created, updated, usage {size, inodes}), parents before their children, so
that import can replay the file in order.

A snapshot whose parent is missing (a damaged store) is still written, and
reported on stderr; import will refuse it.

On a host-scoped etcd root every host's snapshots are written (only --host's
with --host), host by host, each with its "host", and each binding of a
shared layer with its "content" key (the bindings of one layer share its
ID); import and migrate put them back into their hosts' scopes.`,
		Example: `  snapmeta export --store metadata.db > snapshots.jsonl
  snapmeta export --store etcd://127.0.0.1:2379/snapshots -o snapshots.jsonl`,
		Args: storeArgs,
		RunE: func(c *cobra.Command, args []string) error {
			if err := a.positionalStore(c, &addr, args); err != nil {
				return err
			}
			return a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				prog := a.startProgress("export: reading", 0)
				recs, leftOut, err := a.loadRoot(c.Context(), v, prog)
				prog.finish(err == nil)
				if err != nil {
					return err
				}
				ordered, orphans, loops := parentFirstByHost(recs)
				for _, n := range orphans {
					fmt.Fprintf(a.stderr, "snapmeta: warning: snapshot %q has a missing parent; import will refuse it\n", n)
				}
				for _, n := range loops {
					fmt.Fprintf(a.stderr, "snapmeta: warning: snapshot %q is in a parent loop; import will refuse it\n", n)
				}
				err = writeOutput(output, a.stdout, func(w io.Writer) error {
					return writeJSONLines(w, ordered)
				})
				return errors.Join(err, leftOut)
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().StringVarP(&output, "output", "o", "-", "write to this file instead of stdout")
	hostFlag(c, &host, "on a host-scoped etcd root: export this host's snapshots only")
	return c
}

// writeOutput writes to stdout for "-", else to a new file that replaces
// path only once complete.
func writeOutput(path string, stdout io.Writer, fn func(io.Writer) error) error {
	if path == "-" || path == "" {
		bw := bufio.NewWriter(stdout)
		if err := fn(bw); err != nil {
			return err
		}
		return bw.Flush()
	}
	tmp, err := os.CreateTemp(dirOf(path), ".snapmeta-export-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	bw := bufio.NewWriter(tmp)
	if err := fn(bw); err != nil {
		tmp.Close()
		return err
	}
	if err := bw.Flush(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func dirOf(path string) string {
	if i := strings.LastIndexByte(path, '/'); i >= 0 {
		return path[:i+1]
	}
	return "."
}

func (a *app) importCommand() *cobra.Command {
	var addr string
	var skipExisting bool
	var batch int
	c := &cobra.Command{
		Use:   "import [FILE]",
		Short: "Create snapshots from JSON Lines (as export writes them)",
		Long: `Create the snapshots of a JSON Lines file (from export; "-" or no FILE reads
stdin) with their IDs, kinds, parents, labels, times and usage unchanged.
Parents must come before their children, or exist in the store already.

Each batch of --batch lines is one transaction: it is written entirely or
not at all. The import as a whole is not: after a failure the batches
before it stay written (the message says how many snapshots), and running
the same import again with --skip-existing finishes it. On etcd a batch
holds at most 63 snapshots (a larger --batch is refused, not clamped: that
is what one transaction holds with etcd's default --max-txn-ops 128); on a
cluster started with a smaller --max-txn-ops, a batch it refuses as too
large is split in halves, each its own transaction, so such a batch is not
all or nothing. A snapshot whose name exists in the store is refused; with
--skip-existing one whose stored record is identical to the line is skipped
(so an interrupted import can be run again), and one that differs is still
refused. The whole file is read and checked before anything is written.

Records with a "host" (an export of a host-scoped root) go into their
host's scope of an etcd root: the root must be empty (the import makes it
host-scoped) or host-scoped already; each host's scope is opened as that
host (storage.WithHost), which holds the host's lease while its records
are written, so the host cannot start meanwhile, and is refused (exit 1)
while the host is running. IDs are kept; the bindings of a shared layer
("content") are bound again, with their references. Such records cannot
go into a bbolt file or a root without host scopes (exit 2), and a file
may not mix records with and without a host.`,
		Example: `  snapmeta export --store old.db | snapmeta import --store new.db
  snapmeta import --store etcd://127.0.0.1:2379/snapshots snapshots.jsonl --skip-existing`,
		Args: maxArgs(1, "one FILE"),
		RunE: func(c *cobra.Command, args []string) error {
			if err := checkBatch(batch, addr); err != nil {
				return err
			}
			in, name := a.stdin, "stdin"
			if len(args) == 1 && args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				in, name = f, args[0]
			}
			input := readUntilDone(c.Context(), in)
			recs, err := readJSONLines(input, name)
			_ = input.Close() // a read that stopped early frees the copy
			if err != nil {
				return err
			}
			// A bbolt file this import creates goes again if nothing is
			// imported into it: a failed import leaves no empty store.
			newFile := ""
			if ad, err := storeaddr.Parse(addr); err == nil && ad.Engine == storeaddr.Bolt {
				if _, err := os.Stat(ad.Path); errors.Is(err, os.ErrNotExist) {
					newFile = ad.Path
				}
			}
			hosts, groups := byHost(recs)
			scoped := len(hosts) > 1 || len(hosts) == 1 && hosts[0] != ""
			if scoped && slices.Contains(hosts, "") {
				return usageErrorf("%s mixes snapshots with a host and without one: a root is host-scoped or not", name)
			}
			var created int
			err = a.withStore(c.Context(), addr, storeaddr.ReadWrite, func(st storeHandle) error {
				targets := []hostScope{{ms: st.MetaStore}}
				if scoped {
					var err error
					if targets, err = scopedTargets(c.Context(), st, hosts); err != nil {
						return err
					}
					defer closeScopes(targets)
				}
				prog := a.startProgress("import: writing", len(recs))
				var stats writeStats
				var err error
				for _, t := range targets {
					var s writeStats
					s, err = writeRecords(c.Context(), t.ms, groups[t.host], writeOptions{
						batch:        batch,
						skipExisting: skipExisting,
						progress:     prog.add,
					})
					stats.created += s.created
					stats.skipped += s.skipped
					if err != nil {
						if t.host != "" {
							err = fmt.Errorf("host %q: %w", t.host, err)
						}
						break
					}
				}
				prog.finish(err == nil)
				created = stats.created
				if err != nil {
					return fmt.Errorf("%w (%d imported before this)", err, stats.created)
				}
				fmt.Fprintf(a.stdout, "imported %d snapshots, skipped %d identical\n", stats.created, stats.skipped)
				return nil
			})
			if err != nil && newFile != "" && created == 0 {
				_ = os.Remove(newFile)
			}
			return err
		},
	}
	storeFlag(c, &addr)
	c.Flags().BoolVar(&skipExisting, "skip-existing", false, "skip snapshots already stored with an identical record")
	c.Flags().IntVar(&batch, "batch", defaultBatch, fmt.Sprintf("snapshots per transaction (at most %d on etcd)", maxEtcdBatch))
	return c
}

// readUntilDone returns a reader of r that fails with ctx's cause once ctx
// ends, even while a read of r blocks (a pipe or a terminal nobody writes
// to): a signal ends an import at once. The blocked read is left to the
// process's exit. Closing the reader ends the copy of r once its read in
// progress returns.
func readUntilDone(ctx context.Context, r io.Reader) io.ReadCloser {
	pr, pw := io.Pipe()
	stop := context.AfterFunc(ctx, func() { pw.CloseWithError(context.Cause(ctx)) })
	go func() {
		_, err := io.Copy(pw, r)
		stop()
		pw.CloseWithError(err)
	}()
	return pr
}

// readJSONLines reads and checks an export: every line decodes with no
// unknown field, names are unique.
func readJSONLines(r io.Reader, name string) ([]Record, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	var recs []Record
	var lines []int            // the line of each record
	seen := map[string]int{}   // host and name -> line
	seenID := map[string]int{} // ID -> line
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		dec := json.NewDecoder(strings.NewReader(text))
		dec.DisallowUnknownFields()
		var rec Record
		if err := dec.Decode(&rec); err != nil {
			return nil, fmt.Errorf("%s:%d: %v", name, line, err)
		}
		if dec.More() {
			return nil, fmt.Errorf("%s:%d: more than one JSON value on the line", name, line)
		}
		if err := rec.validate(); err != nil {
			return nil, fmt.Errorf("%s:%d: %v", name, line, err)
		}
		if prev, dup := seen[recordKey(rec)]; dup {
			return nil, fmt.Errorf("%s:%d: snapshot %q is already on line %d", name, line, qualify(rec.Host, rec.Name), prev)
		}
		if prev, dup := seenID[rec.ID]; dup {
			// The bindings of one shared layer, in several hosts' scopes,
			// share its ID.
			if p := recs[slices.Index(lines, prev)]; rec.Content == "" || p.Content != rec.Content || p.Host == rec.Host {
				return nil, fmt.Errorf("%s:%d: snapshot %q has the ID %s of line %d", name, line, qualify(rec.Host, rec.Name), rec.ID, prev)
			}
		}
		seen[recordKey(rec)], seenID[rec.ID] = line, line
		recs = append(recs, rec)
		lines = append(lines, line)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	for _, rec := range recs {
		if pl, ok := seen[recordKey(Record{Host: rec.Host, Name: rec.Parent})]; ok && pl > seen[recordKey(rec)] {
			return nil, fmt.Errorf("%s:%d: snapshot %q comes before its parent %q (line %d); parents must come first", name, seen[recordKey(rec)], qualify(rec.Host, rec.Name), rec.Parent, pl)
		}
	}
	return recs, nil
}

type writeOptions struct {
	batch        int
	skipExisting bool
	// existingHint is said after the refusal of an identical record.
	existingHint string
	// progress is told how many records each committed batch covered.
	progress func(n int)
}

type writeStats struct {
	created, skipped int
}

// writeRecords creates recs (parents first) in batches of opts.batch, one
// transaction each, through the import hook.
func writeRecords(ctx context.Context, ms storage.MetaStore, recs []Record, opts writeOptions) (writeStats, error) {
	var stats writeStats
	// Import takes IDs as given: refuse one that another snapshot of the
	// target holds (the target is not expected to change meanwhile).
	var ids map[string]string
	if err := ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		ids, err = storage.IDMap(ctx)
		return err
	}); err != nil {
		return stats, err
	}
	for _, r := range recs {
		if holder, ok := ids[r.ID]; ok && holder != r.Name {
			return stats, fmt.Errorf("snapshot %q: ID %s belongs to snapshot %q in the store: %w", r.Name, r.ID, holder, errdefs.ErrAlreadyExists)
		}
	}
	if opts.existingHint == "" {
		opts.existingHint = "use --skip-existing to skip identical records"
	}
	for start := 0; start < len(recs); start += opts.batch {
		end := min(start+opts.batch, len(recs))
		if err := writeBatch(ctx, ms, recs[start:end], opts, &stats); err != nil {
			return stats, err
		}
	}
	return stats, nil
}

// writeBatch writes one batch in one transaction, splitting it when the
// engine finds it too large.
func writeBatch(ctx context.Context, ms storage.MetaStore, batch []Record, opts writeOptions, stats *writeStats) error {
	var created, skipped int
	err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		// WithTransaction may run this again after a conflict.
		created, skipped = 0, 0
		var todo []Record
		for _, r := range batch {
			id, info, usage, err := storage.GetInfo(ctx, r.Name)
			if isNotFound(err) {
				todo = append(todo, r)
				continue
			}
			if err != nil {
				return err
			}
			got := newRecord(id, info, usage)
			// GetInfo tells neither: the scope is the transaction's, and
			// a content key is checked by the final comparison.
			got.Host, got.Content = r.Host, r.Content
			if d := diff(r, got); d != "" {
				return fmt.Errorf("snapshot %q exists with a different record (given vs stored: %s): %w", r.Name, d, errdefs.ErrAlreadyExists)
			}
			if !opts.skipExisting {
				return fmt.Errorf("snapshot %q exists (identical; %s): %w", r.Name, opts.existingHint, errdefs.ErrAlreadyExists)
			}
			skipped++
		}
		if len(todo) == 0 {
			return nil
		}
		created = len(todo)
		return importSnapshots(ctx, todo)
	})
	if err != nil && errdefs.IsResourceExhausted(err) && len(batch) > 1 && !errors.Is(err, context.Canceled) {
		half := len(batch) / 2
		if err := writeBatch(ctx, ms, batch[:half], opts, stats); err != nil {
			return err
		}
		return writeBatch(ctx, ms, batch[half:], opts, stats)
	}
	if err != nil {
		return err
	}
	stats.created += created
	stats.skipped += skipped
	if opts.progress != nil {
		opts.progress(len(batch))
	}
	return nil
}

package main

import (
	"fmt"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

func (a *app) checkCommand() *cobra.Command {
	var addr string
	c := &cobra.Command{
		Use:   "check",
		Short: "Verify the store's invariants",
		Long: `Verify every invariant of the store in one read-only transaction: every
record decodes; every parent exists and is committed; the children index
holds exactly the parent links; IDs are unique and none is above what the
ID allocator handed out; every stored parent chain equals the followed one.

On bbolt, damage to the file's pages (bbolt's own check of pages and
freelist) is reported first, each line beginning with "page damage: ";
'snapmeta salvage' copies what can still be read to a new file.

Exit code 0: no problem. 1: one line per problem on stdout. 2: the store
could not be read (missing, locked, unreachable, or damaged so that it
cannot be opened: the message names 'snapmeta salvage').`,
		Example: `  snapmeta check --store /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/metadata.db
  snapmeta check --store etcd://127.0.0.1:2379/snapshots || echo "store damaged"`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			var problems []storage.Problem
			var count int
			err := a.withStore(c.Context(), addr, storeaddr.ReadOnly, func(st storeHandle) error {
				var err error
				if problems, err = storage.Check(c.Context(), st); err != nil {
					return err
				}
				// The count is for the summary only; a store too damaged
				// to list is still checked.
				if recs, bad, err := loadAll(c.Context(), st); err == nil {
					count = len(recs) + len(bad)
				} else {
					count = -1
				}
				return nil
			})
			if err != nil {
				if _, ok := err.(*usageError); ok {
					return err
				}
				return &exitError{code: 2, err: err}
			}
			// Page damage first, apart: it is repaired by salvage, not by
			// fixing records. Each such line begins with "page damage: ".
			for _, p := range problems {
				if p.Page {
					fmt.Fprintln(a.stdout, p.String())
				}
			}
			for _, p := range problems {
				if !p.Page {
					fmt.Fprintln(a.stdout, p.String())
				}
			}
			if len(problems) > 0 {
				return &exitError{code: 1, err: fmt.Errorf("%d problem(s) found", len(problems))}
			}
			if count >= 0 {
				fmt.Fprintf(a.stdout, "ok: %d snapshots, no problems\n", count)
			} else {
				fmt.Fprintln(a.stdout, "ok: no problems")
			}
			return nil
		},
	}
	storeFlag(c, &addr)
	return c
}

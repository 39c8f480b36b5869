package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

func (a *app) checkCommand() *cobra.Command {
	var addr, host string
	var asJSON bool
	c := &cobra.Command{
		Use:   "check [STORE]",
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
cannot be opened: the message names 'snapmeta salvage').

--json writes one JSON object instead, for exit codes 0 and 1 alike:
{"ok": BOOL, "snapshots": N, "problems": [{"snapshot": NAME, "detail": TEXT,
"page_damage": BOOL}, ...]}, page damage first; "snapshot" is "" for a
problem of the store as a whole, and "snapshots" is left out when the store
is too damaged to count. The exit codes do not change; an unreadable store
(2) writes nothing on stdout, its reason on stderr.

On a host-scoped etcd root the whole root is checked: every host's scope,
and the shared layers, their references and their content index. A problem
in a host's scope begins with 'host "H": ' (JSON: "host": H, left out for
problems of the root as a whole). --host H reports only H's problems and
those of the root as a whole; the count is then of H's snapshots.`,
		Example: `  snapmeta check --store /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/metadata.db
  snapmeta check --store etcd://127.0.0.1:2379/snapshots || echo "store damaged"
  snapmeta check --store metadata.db --json | jq -r '.problems[].detail'`,
		Args: storeArgs,
		RunE: func(c *cobra.Command, args []string) error {
			if err := a.positionalStore(c, &addr, args); err != nil {
				return err
			}
			var problems []storage.Problem
			var count int
			err := a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				ms, closeMS, err := v.anyScope()
				if err != nil {
					return err
				}
				defer closeMS()
				prog := a.startProgress("check: checking invariants", 0)
				problems, err = storage.Check(c.Context(), ms)
				prog.finish(err == nil)
				if err != nil {
					return err
				}
				if host != "" {
					kept := problems[:0]
					for _, p := range problems {
						if p.Host == host || p.Host == "" {
							kept = append(kept, p)
						}
					}
					problems = kept
				}
				// The count is for the summary only; a store too damaged
				// to list is still checked.
				prog = a.startProgress("check: counting", 0)
				count = 0
				for _, s := range v.scopes {
					recs, bad, err := loadAll(c.Context(), s.ms, prog)
					if err != nil {
						count = -1
						break
					}
					count += len(recs) + len(bad)
				}
				prog.finish(count >= 0)
				return nil
			})
			if err != nil {
				if _, ok := err.(*usageError); ok {
					return err
				}
				return &exitError{code: 2, err: err}
			}
			// Page damage first, apart: it is repaired by salvage, not by
			// fixing records.
			ordered := make([]storage.Problem, 0, len(problems))
			for _, p := range problems {
				if p.Page {
					ordered = append(ordered, p)
				}
			}
			for _, p := range problems {
				if !p.Page {
					ordered = append(ordered, p)
				}
			}
			var werr error
			if asJSON {
				werr = writeCheckJSON(a.stdout, ordered, count)
			} else {
				// Each page damage line begins with "page damage: ".
				for _, p := range ordered {
					fmt.Fprintln(a.stdout, p.String())
				}
			}
			if len(problems) > 0 {
				return &exitError{code: 1, err: fmt.Errorf("%d problem(s) found", len(problems))}
			}
			if werr != nil || asJSON {
				return werr
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
	c.Flags().BoolVar(&asJSON, "json", false, "write the result as one JSON object")
	hostFlag(c, &host, "on a host-scoped etcd root: report this host's problems only")
	return c
}

// checkJSON is what check --json writes. Problems is never null, so that a
// script can iterate it without a test for a clean store.
type checkJSON struct {
	OK        bool          `json:"ok"`
	Snapshots *int          `json:"snapshots,omitempty"`
	Problems  []problemJSON `json:"problems"`
}

type problemJSON struct {
	Host       string `json:"host,omitempty"`
	Snapshot   string `json:"snapshot"`
	Detail     string `json:"detail"`
	PageDamage bool   `json:"page_damage"`
}

// writeCheckJSON writes problems (already in output order) and the count
// of snapshots (negative when unknown).
func writeCheckJSON(w io.Writer, problems []storage.Problem, count int) error {
	out := checkJSON{OK: len(problems) == 0, Problems: []problemJSON{}}
	if count >= 0 {
		out.Snapshots = &count
	}
	for _, p := range problems {
		out.Problems = append(out.Problems, problemJSON{Host: p.Host, Snapshot: p.Snapshot, Detail: p.Detail, PageDamage: p.Page})
	}
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func (a *app) versionCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print snapmeta's version",
		Long:    `Print the module version snapmeta was built from, its VCS revision when known, and the Go release.`,
		Example: "  snapmeta version",
		Args:    exactArgs(0, "no arguments"),
		RunE: func(*cobra.Command, []string) error {
			fmt.Fprintln(a.stdout, versionString())
			return nil
		},
	}
}

// versionString is "snapmeta VERSION (REVISION[, modified], GO)"; a build
// from a checkout has the version "(devel)".
func versionString() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "snapmeta (unknown version)"
	}
	details := []string{}
	var rev string
	var modified bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if rev != "" {
		details = append(details, rev[:min(12, len(rev))])
	}
	if modified {
		details = append(details, "modified")
	}
	details = append(details, bi.GoVersion)
	return fmt.Sprintf("snapmeta %s (%s)", bi.Main.Version, strings.Join(details, ", "))
}

// envName is the environment variable that sets a flag: SNAPMETA_ and the
// flag's name in capitals, with _ for -.
func envName(flag string) string {
	return "SNAPMETA_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// flagsFromEnv sets every flag of c not given on the command line from its
// environment variable (see envName); the command line wins. It returns
// the names of the flags it set.
func flagsFromEnv(c *cobra.Command) (map[string]bool, error) {
	var err error
	set := map[string]bool{}
	c.Flags().VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed || f.Name == "help" {
			return
		}
		v, ok := os.LookupEnv(envName(f.Name))
		if !ok {
			return
		}
		if serr := c.Flags().Set(f.Name, v); serr != nil {
			err = usageErrorf("$%s: %v (see '%s --help')", envName(f.Name), serr, c.CommandPath())
		}
		set[f.Name] = true
	})
	return set, err
}

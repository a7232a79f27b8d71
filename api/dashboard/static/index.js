// The front page: the exams of the day first, all jobs on the second tab (#jobs); sign-in; start-up.
"use strict";

function showTab() {
  const tab = location.hash === "#jobs" ? "jobs" : "exams";
  for (const name of ["exams", "jobs"]) {
    document.getElementById(`view-${name}`).hidden = name !== tab;
    document.getElementById(`tab-${name}`).setAttribute("aria-selected", String(name === tab));
  }
}

window.addEventListener("hashchange", showTab);
showTab();

(async () => {
  await ReconQ.loadMe(() => { fillFilters(); reload(); loadPanels(); Exams.reload(); });
  Exams.start();
  fillFilters();
  if (await loadJobs()) startListening();
  loadPanels();
  setInterval(loadGpus, 10000);
  setInterval(loadDisk, 30000);
})();
